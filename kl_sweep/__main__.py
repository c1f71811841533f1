import sys

from kl_sweep.workers import might_ask_for_joblib, start_forkserver

if __name__ == "__main__":
    if might_ask_for_joblib(sys.argv[1:]):
        start_forkserver()  # before the command line's imports: the workers' imports start sooner
    from kl_sweep.cli import main
    from kl_sweep.shutdown import run_then_exit

    run_then_exit(main)
