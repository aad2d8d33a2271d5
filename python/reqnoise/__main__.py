import sys

from reqnoise.cli import main

sys.exit(main())
