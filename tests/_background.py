"""Subprocess runs started when the suite is collected and waited for by their tests at the
end of the session, so that a run that keeps one core busy for minutes (the CUDA
simulator, a compile into an empty Numba cache) overlaps the rest of the suite instead
of adding to it.

A test that checks such a run carries ``@pytest.mark.background(run)``; ``conftest.py``
starts every marked run at collection, moves the marked tests to the end (in the order
the runs were started, so the longest-waiting run is checked first) and stops whatever
is left running when the session ends.  Tests selected away never start their run.
"""

import os
import pathlib
import signal
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Starts the line printed before each command's output.
HEADER = "### background command"
#: A run on a slow, loaded 2-core CI machine; a hang fails its test instead of blocking CI.
DEFAULT_TIMEOUT_S = 1500


class BackgroundRun:
    """Named commands (shell-free argv lists) run in order while each succeeds, in a
    subprocess, with their output collected in a temporary file.

    ``env`` adds to (or, where a value is None, removes from) this process's environment;
    ``{scratch}`` in a command or an ``env`` value is replaced by a fresh temporary
    directory that lives as long as the run.
    """

    def __init__(self, name, commands, env=None, timeout=DEFAULT_TIMEOUT_S):
        self.name = name
        self.commands = dict(commands)
        self.env = env or {}
        self.timeout = timeout
        self.scratch = None
        self._process = None
        self._output = None
        self._scratch_dir = None

    def __repr__(self):
        return f"BackgroundRun({self.name!r})"

    @property
    def started(self):
        return self._process is not None

    def _expand(self, text):
        return text.replace("{scratch}", self.scratch)

    def _header(self, command):
        return f"{HEADER} {command}\n"

    def _script(self):
        """The commands as one Python driver: each runs after the previous one succeeded,
        its output after a header line (:meth:`output` splits on them)."""
        lines = ["import subprocess, sys"]
        for command, argv in self.commands.items():
            lines.append(f"print({self._header(command)!r}, end='', flush=True)")
            lines.append(f"rc = subprocess.call({[self._expand(a) for a in argv]!r})")
            lines.append("rc and sys.exit(rc)")
        return "\n".join(lines)

    def start(self):
        """Start the run (once)."""
        if self.started:
            return
        self._scratch_dir = tempfile.TemporaryDirectory(prefix=f"fastbn-{self.name}-")
        self.scratch = self._scratch_dir.name
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = self._expand(value)
        self._output = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen([sys.executable, "-c", self._script()], cwd=REPO_ROOT, env=env,
                                         stdout=self._output, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)

    def result(self):
        """``(returncode, output)`` once the run has ended (started now if it was not)."""
        self.start()
        returncode = self._process.wait(timeout=self.timeout)
        self._output.seek(0)
        return returncode, self._output.read()

    def output(self, command):
        """What ``command`` printed, once it succeeded (an AssertionError with the whole
        output when it, or a command before it, failed)."""
        returncode, text = self.result()
        names = list(self.commands)
        following = names.index(command) + 1
        after = text.partition(self._header(command))[2]
        if following < len(names):
            part, next_header, _ = after.partition(self._header(names[following]))
            succeeded = bool(next_header)  # the next command runs only after this one succeeded
        else:
            part, succeeded = after, returncode == 0
        assert succeeded, f"{self}: {command!r} failed (exit status {returncode}):\n{text}"
        return part

    def stop(self):
        """Kill the run if it is still going (the session ended early); drop its files."""
        if not self.started:
            return
        if self._process.poll() is None:
            # The whole process group: the driver and the command it is running.
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._output.close()
        self._scratch_dir.cleanup()
