import sys

from lesion_client.cli import main

sys.exit(main())
