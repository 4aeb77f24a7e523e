import runpy, sys
sys.path.insert(0, ".")
import kernels
kernels.GATHER_SPLIT = int(sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
