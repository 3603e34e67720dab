import sys

from djangoshop import seed

seed(sys.argv[1])
