"""`python -m gptlib.torchrun ARGS` = `torchrun ARGS`, except that it stops when the process that
started it dies: Linux sends it SIGTERM, on which torchrun terminates its workers. The launcher uses
this so that killing a notebook kernel or `gptlib train` never leaves workers behind."""

import runpy
import signal

from gptlib.lifeline import die_with_parent

if __name__ == "__main__":
    die_with_parent(signal.SIGTERM)
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
