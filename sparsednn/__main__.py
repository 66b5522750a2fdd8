import sys

from sparsednn.cli import main

sys.exit(main())
