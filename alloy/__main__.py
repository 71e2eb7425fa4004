import sys

from alloy.cli import main

sys.exit(main())
