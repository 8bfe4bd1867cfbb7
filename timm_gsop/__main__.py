"""``python -m timm_gsop COMMAND``: the same as ``timm-gsop COMMAND``."""
import sys

from timm_gsop_cli import main

sys.exit(main())
