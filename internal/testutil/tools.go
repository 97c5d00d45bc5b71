package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// RequireToolsEnv names the environment variable that turns a missing tool
// from a skip into a failure. CI (.ci/run) sets it to 1, so that the checks
// against other people's implementations (cloud-init, sshd, rsync, boto3,
// Buildbot, python-jenkins, a JDK, shellcheck…) cannot silently stop running
// because a package went missing from the machine.
const RequireToolsEnv = "HANGAR_REQUIRE_TOOLS"

// RequireTools reports whether HANGAR_REQUIRE_TOOLS is set to a true value
// (1, t, true…).
func RequireTools() bool {
	on, _ := strconv.ParseBool(os.Getenv(RequireToolsEnv))
	return on
}

// ToolMissing ends the test because something it checks against is not
// installed: it skips with the message, or fails with it when
// HANGAR_REQUIRE_TOOLS=1. The message should say how to install the tool.
// Use it only for a missing tool, never for an environment a developer
// cannot be expected to have (a live cloud account, free disk space).
func ToolMissing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	msg := fmt.Sprintf(format, args...)
	if RequireTools() {
		tb.Fatalf("%s (%s=1: a missing tool fails the test instead of skipping it)", msg, RequireToolsEnv)
		return
	}
	tb.Skip(msg)
}

// NeedTool returns the path of the program name (looked up on PATH unless it
// contains a slash), or ends the test with ToolMissing, saying why the test
// needs it and how to install it, e.g.
//
//	shellcheck := testutil.NeedTool(t, "shellcheck", "lints the bootstrap; apt-get install shellcheck")
func NeedTool(tb testing.TB, name, why string) string {
	tb.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		ToolMissing(tb, "%s is not installed (%s): %v", name, why, err)
	}
	return path
}

// NeedTools is NeedTool for several programs at once.
func NeedTools(tb testing.TB, why string, names ...string) {
	tb.Helper()
	for _, name := range names {
		NeedTool(tb, name, why)
	}
}

// NeedPythonModule ends the test with ToolMissing unless the Python
// interpreter python (a name on PATH or a path) can import module.
func NeedPythonModule(tb testing.TB, python, module, why string) {
	tb.Helper()
	python = NeedTool(tb, python, why)
	if out, err := exec.Command(python, "-c", "import "+module).CombinedOutput(); err != nil {
		ToolMissing(tb, "%s cannot import %s (%s): %v\n%s", python, module, why, err, out)
	}
}
