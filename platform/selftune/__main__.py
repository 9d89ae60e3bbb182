import sys

from selftune.cli import main

sys.exit(main())
