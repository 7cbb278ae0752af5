import sys

from ct2i.cli import main

sys.exit(main())
