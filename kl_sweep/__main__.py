from kl_sweep.cli import main
from kl_sweep.shutdown import run_then_exit

if __name__ == "__main__":
    run_then_exit(main)
