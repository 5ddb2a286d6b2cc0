"""`python -m amanlib ARGS` for bench/gpu.sh's phases, stoppable by `timeout`: SIGTERM (and SIGINT, which a
background job may have inherited as ignored) raise KeyboardInterrupt, so papermill shuts its kernel down and the
finished folds stay written; bench/gpu.sh stops any kernel left over."""
import signal
import sys


def _stop(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum} (bench/gpu.sh's phase limit)")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from amanlib.cli import main
    sys.exit(main(sys.argv[1:]))
