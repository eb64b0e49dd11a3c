"""`python -m tritonlstm.tune`: the tuner's command line (the tuner and the cache live in tritonlstm.tuning)."""

import sys

from tritonlstm.tuning import main

if __name__ == "__main__":
    sys.exit(main())
