"""The composition root: the only package that wires several layers together.

`ct2i.cli` (the `ct2i` command), `ct2i.job` (the `ray job submit` entrypoint), `ct2i.demo` (`make demo`) and
`ct2i.scheduler` (the scheduler actor, with the runner its settings name) import `cluster`, `tune` and `serve`;
those layers import `causalt2i` and, for `tune` and `serve`, `cluster`, never each other's entry points.
"""
