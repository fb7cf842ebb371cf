import sys

from blockdrop.cli import main

sys.exit(main())
