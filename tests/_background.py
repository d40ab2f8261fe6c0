"""Subprocess runs started when the suite is collected and waited for by their tests at the
end of the session, so that a run that keeps one core busy for minutes (the CUDA
simulator, a compile into an empty Numba cache) overlaps the rest of the suite instead
of adding to it.

A test that checks a command of such a run carries ``@pytest.mark.background(run,
command)``; ``conftest.py`` starts every run at collection with the commands the selected
tests check (a test selected away costs nothing), moves those tests to the end (in the
order the runs were started) and stops whatever is left running when the session ends.
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
    """Named commands (shell-free argv lists), those started run in the order they were
    added while each succeeds, in one subprocess, their output collected in a temporary file.

    ``env`` adds to (or, where a value is None, removes from) this process's environment;
    ``{scratch}`` in a command or an ``env`` value is replaced by a fresh temporary
    directory that lives as long as the run.
    """

    def __init__(self, name, commands=(), env=None, timeout=DEFAULT_TIMEOUT_S):
        self.name = name
        self.commands = dict(commands)
        self.selected = []
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

    def add(self, command, argv):
        """Add ``argv`` as ``command`` (before the run starts); returns ``command``."""
        assert not self.started and command not in self.commands, command
        self.commands[command] = argv
        return command

    def _expand(self, text):
        return text.replace("{scratch}", self.scratch)

    def _header(self, command):
        return f"{HEADER} {command}\n"

    def _script(self):
        """The commands as one Python driver: each runs after the previous one succeeded,
        its output after a header line (:meth:`output` splits on them)."""
        lines = ["import subprocess, sys"]
        for command in self.selected:
            lines.append(f"print({self._header(command)!r}, end='', flush=True)")
            lines.append(f"rc = subprocess.call({[self._expand(a) for a in self.commands[command]]!r})")
            lines.append("rc and sys.exit(rc)")
        return "\n".join(lines)

    def start(self, commands=None):
        """Start the run (once) with the named ``commands`` (default: all), in the order
        they were added."""
        if self.started:
            return
        wanted = set(self.commands if commands is None else commands)
        self.selected = [command for command in self.commands if command in wanted]
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
        """``(returncode, output)`` once the run has ended (started now, with every
        command, if it was not)."""
        self.start()
        returncode = self._process.wait(timeout=self.timeout)
        self._output.seek(0)
        return returncode, self._output.read()

    def output(self, command):
        """What ``command`` printed, once it succeeded (an AssertionError with the whole
        output when it, or a command before it, failed)."""
        returncode, text = self.result()
        names = self.selected
        assert command in names, f"{self}: {command!r} was not started"
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
