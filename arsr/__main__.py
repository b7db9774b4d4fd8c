import sys

from arsr.cli import main

sys.exit(main())
