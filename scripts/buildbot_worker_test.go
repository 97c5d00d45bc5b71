package scripts

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
)

// The served buildbot-worker.sh is its own part followed by generic.sh, so
// the protocol has one implementation.
func TestBuildbotWorkerScriptIncludesGeneric(t *testing.T) {
	served, err := BootstrapScript("buildbot-worker.sh")
	if err != nil {
		t.Fatal(err)
	}
	generic, err := BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	_, genericBody, _ := bytes.Cut(generic, []byte("\n"))
	if !bytes.HasPrefix(served, []byte("#!/bin/bash\n")) || !bytes.HasSuffix(served, genericBody) {
		t.Errorf("served buildbot-worker.sh does not end with generic.sh less its #! line")
	}
	if bytes.Contains(served, []byte(includeDirective)) {
		t.Errorf("served buildbot-worker.sh still has an include line")
	}
	if got, want := DefaultWorkerCommand("buildbot-worker.sh"), `exec bash "$HANGAR_BUILDBOT_START"`; got != want {
		t.Errorf("DefaultWorkerCommand(buildbot-worker.sh) = %q, want %q", got, want)
	}
	if got := DefaultWorkerCommand("generic.sh"); got != "" {
		t.Errorf("DefaultWorkerCommand(generic.sh) = %q, want none", got)
	}

	shellcheck := testutil.NeedTool(t, "shellcheck", "apt-get install shellcheck")
	// The start script is a here-document, which shellcheck does not read
	// as code: check it on its own too.
	_, start, _ := bytes.Cut(served, []byte("<<'START'\n"))
	start, _, _ = bytes.Cut(start, []byte("\nSTART\n"))
	dir := t.TempDir()
	for name, body := range map[string][]byte{"buildbot-worker.sh": served, "start-worker.sh": start} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, body, 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(shellcheck, path).CombinedOutput(); err != nil {
			t.Errorf("shellcheck %s: %v\n%s", name, err, out)
		}
	}
}

// On an instance without buildbot-worker the script installs it, then runs
// a worker per assignment, with the password in its environment only, and
// stops it on release. apt-get and buildbot-worker are stand-ins that
// record their arguments; the end-to-end test in cmd/hangar runs the real
// buildbot-worker.
func TestBuildbotWorkerBootstrap(t *testing.T) {
	dir := t.TempDir()
	file := func(name string) string { return filepath.Join(dir, name) }
	bin := file("bin")
	if err := os.Mkdir(bin, 0o700); err != nil {
		t.Fatal(err)
	}
	// Only these tools, so that the system's buildbot-worker is not found.
	for _, tool := range []string{"bash", "curl", "mktemp", "rm", "sleep", "setsid", "kill", "cat", "mkdir",
		"chmod", "mv", "sed", "grep", "head", "env", "touch", "sha256sum"} {
		path := testutil.NeedTool(t, tool, "the worker script's tools; bash, curl and coreutils")
		if err := os.Symlink(path, filepath.Join(bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	fakeWorker := `#!/bin/bash
printf '%s\n' "$*" >> "$FAKE_LOG"
case $1 in
create-worker)
	dir=${@: -4:1}
	mkdir -p "$dir"
	printf "import os\nworkername = '%s'\npasswd = '%s'\n" "${@: -2:1}" "${@: -1}" > "$dir/buildbot.tac" ;;
--version) echo "worker version: fake" ;;
start)
	env -0 > "$FAKE_DIR/worker.env.tmp" && mv "$FAKE_DIR/worker.env.tmp" "$FAKE_DIR/worker.env"
	exec sleep 600 ;;
esac
`
	fakeAptGet := `#!/bin/bash
printf 'apt-get %s\n' "$*" >> "$FAKE_LOG"
if [ "${*: -1}" = buildbot-worker ]; then
	cat > "$FAKE_DIR/bin/buildbot-worker" <<'EOF'
` + fakeWorker + `EOF
	chmod 0755 "$FAKE_DIR/bin/buildbot-worker"
fi
`
	if err := os.WriteFile(filepath.Join(bin, "apt-get"), []byte(fakeAptGet), 0o755); err != nil {
		t.Fatal(err)
	}

	srv := &protocolServer{t: t}
	srv.assign = func(n int, current string) string {
		switch n {
		case 1:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-1", "HANGAR_WORKER_NAME", "bb-1",
				"HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "master.example.com:9989",
				"HANGAR_WORKER_COMMAND", DefaultWorkerCommand("buildbot-worker.sh"))
		case 2:
			waitForFile(t, file("worker.env"))
			return answer("HANGAR_ASSIGNMENT", "released")
		default:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()

	script, err := BootstrapScript("buildbot-worker.sh")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file("bootstrap.sh"), script, 0o700); err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(file("output"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = out.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "bash"), file("bootstrap.sh"))
	cmd.Dir = dir
	cmd.Env = []string{
		"PATH=" + bin,
		"HOME=" + dir,
		"TMPDIR=" + dir,
		"HANGAR_URL=" + hs.URL,
		"HANGAR_POOL=bb",
		"HANGAR_BOOTSTRAP_TOKEN=" + testToken,
		"HANGAR_SSH_HOST_KEY_FILE=" + file("none"),
		// Not HANGAR_ROOT, which says this is the local cloud.
		"HANGAR_STATE_DIR=" + file("state"),
		"BUILDBOT_WORKER_OPTIONS=--keepalive=60 --umask=0o22",
		"BUILDBOT_WORKER_VENV=" + file("venv"),
		"FAKE_LOG=" + file("calls"),
		"FAKE_DIR=" + dir,
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	runErr := cmd.Wait()
	output, _ := os.ReadFile(file("output"))
	if runErr != nil {
		t.Fatalf("buildbot-worker.sh: %v\n%s", runErr, output)
	}
	t.Logf("output:\n%s", output)

	calls, _ := os.ReadFile(file("calls"))
	tac, _ := os.ReadFile(filepath.Join(dir, "buildbot-worker", "bb-1", "buildbot.tac"))
	for _, secret := range []string{testPassword, testToken} {
		if bytes.Contains(output, []byte(secret)) || bytes.Contains(calls, []byte(secret)) || bytes.Contains(tac, []byte(secret)) {
			t.Errorf("a secret is in the output, a command line or buildbot.tac")
		}
	}
	workerDir := filepath.Join(dir, "buildbot-worker", "bb-1")
	for _, want := range []string{
		"apt-get -q -o DPkg::Lock::Timeout=300 update",
		"install --no-install-recommends buildbot-worker",
		"create-worker --quiet --force --keepalive=60 --umask=0o22 " + workerDir + " master.example.com:9989 bb-1 from-environment",
		"start --nodaemon " + workerDir,
	} {
		if !bytes.Contains(calls, []byte(want)) {
			t.Errorf("no call %q among:\n%s", want, calls)
		}
	}
	if !bytes.Contains(tac, []byte("\npasswd = os.environ.pop('HANGAR_WORKER_PASSWORD')\n")) {
		t.Errorf("buildbot.tac does not take the password from the environment:\n%s", tac)
	}
	if env := readEnv(t, file("worker.env")); env["HANGAR_WORKER_PASSWORD"] != testPassword || env["HANGAR_BOOTSTRAP_TOKEN"] != "" {
		t.Errorf("the worker's environment lacks the password or has the bootstrap token")
	}
	for _, want := range []string{
		"hangar-bootstrap: installing buildbot-worker",
		"hangar-buildbot: worker bb-1 connecting to master.example.com:9989",
		"hangar-bootstrap: worker for lease lease-1 stopped",
		"hangar-bootstrap: Hangar asked this instance to terminate",
	} {
		if !strings.Contains(string(output), want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

// On the local cloud an instance is the host: the script never installs
// packages there, and says what is missing.
func TestBuildbotWorkerBootstrapLocalCloud(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o700); err != nil {
		t.Fatal(err)
	}
	bash := testutil.NeedTool(t, "bash", "runs the worker script")
	calls := filepath.Join(dir, "calls")
	if err := os.WriteFile(filepath.Join(bin, "apt-get"), []byte("#!"+bash+"\necho \"$*\" >> "+calls+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	script, err := BootstrapScript("buildbot-worker.sh")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bash, "-c", string(script))
	cmd.Env = []string{"PATH=" + bin, "HOME=" + dir, "HANGAR_ROOT=" + dir, "HANGAR_URL=http://127.0.0.1:1",
		"HANGAR_POOL=bb", "HANGAR_BOOTSTRAP_TOKEN=" + testToken}
	out, err := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(string(out), "buildbot-worker is missing; on the local cloud install it on this machine yourself") {
		t.Errorf("exit code %d (%v), want 1 and a message; output:\n%s", code, err, out)
	}
	if _, err := os.Stat(calls); err == nil {
		t.Error("apt-get ran on the local cloud")
	}
}
