"""The Kubernetes deployment of the platform: kustomize manifests (base/, components/, overlays/, jobs/)
and the offline checks that keep them right (`k8s.validation`, `k8s.serve_config`).

It reads manifests; it does not run the platform: of the other layers it imports only
`causalt2i.atomic` (for the generated files' atomic writes).
"""
