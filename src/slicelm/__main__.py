import sys

from slicelm.cli import main

sys.exit(main())
