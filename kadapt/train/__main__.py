"""``python -m kadapt.train``: the ``kadapt-train`` command."""
import sys

from kadapt.train import main

sys.exit(main())
