package scripts

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
)

const jenkinsSecret = "8a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5061728394a5b6c7d8e9f"

// stubJava stands in for java: per run it records, in $STUB_DIR/N.*, its
// arguments one a line, the secret it was pointed at, that file's mode and
// path, whether the password reached its environment, and its umask; then
// it waits to be stopped, or exits at once with $STUB_EXIT when set.
const stubJava = `#!/bin/bash
n=1
while [ -e "$STUB_DIR/$n.args" ]; do n=$((n + 1)); done
out=$STUB_DIR/$n
for a in "$@"; do
	case $a in @*) f=${a#@}; cat "$f" > "$out.secret"; stat -c %a "$f" > "$out.mode"; echo "$f" > "$out.secret-path" ;; esac
done
env | grep -c HANGAR_WORKER_PASSWORD > "$out.password-in-env"
umask > "$out.umask"
printf '%s\n' "$@" > "$out.args"
if [ -n "${STUB_EXIT:-}" ]; then
	exit "$STUB_EXIT"
fi
# Like java: a TERM is an exit with status 143.
trap 'exit 143' TERM
sleep 600 &
wait
`

// jarModified is when the controller's agent.jar last changed.
var jarModified = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// jarServer is a controller's /jenkins/jnlpJars/agent.jar.
type jarServer struct {
	mu       sync.Mutex
	gets     int
	notFound bool
}

func (s *jarServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.URL.Path != "/jenkins/jnlpJars/agent.jar" || s.notFound {
		http.NotFound(w, r)
		return
	}
	s.gets++
	http.ServeContent(w, r, "agent.jar", jarModified, strings.NewReader("PK fake jar"))
}

func (s *jarServer) requests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gets
}

// The served jenkins-agent.sh is its own part followed by generic.sh, so
// the protocol has one implementation.
func TestJenkinsAgentScriptIncludesGeneric(t *testing.T) {
	served, err := BootstrapScript("jenkins-agent.sh")
	if err != nil {
		t.Fatal(err)
	}
	generic, err := BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	_, genericBody, _ := bytes.Cut(generic, []byte("\n"))
	if !bytes.HasPrefix(served, []byte("#!/bin/bash\n")) || !bytes.HasSuffix(served, genericBody) || bytes.Contains(served, []byte(includeDirective)) {
		t.Errorf("served jenkins-agent.sh is not its own part followed by generic.sh less its #! line")
	}
	if got, want := DefaultWorkerCommand("jenkins-agent.sh"), `exec bash "$HANGAR_JENKINS_AGENT"`; got != want {
		t.Errorf("DefaultWorkerCommand(jenkins-agent.sh) = %q, want %q", got, want)
	}
	shellcheck := testutil.NeedTool(t, "shellcheck", "apt-get install shellcheck")
	path := filepath.Join(t.TempDir(), "jenkins-agent.sh")
	if err := os.WriteFile(path, served, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(shellcheck, path).CombinedOutput(); err != nil {
		t.Errorf("shellcheck: %v\n%s", err, out)
	}
}

// runScript runs script with bash in dir, with a clean environment plus
// env, its output going to dir/output, and returns the output and exit
// code. The script's process group is killed when the test ends.
func runScript(t *testing.T, dir string, script []byte, env ...string) (string, int) {
	t.Helper()
	path := filepath.Join(dir, fmt.Sprintf("script-%d.sh", time.Now().UnixNano()))
	if err := os.WriteFile(path, script, 0o700); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", path)
	cmd.Dir = dir
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "TMPDIR=" + dir}, env...)
	outPath := filepath.Join(dir, "output")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = out.Close() }()
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	err = cmd.Wait()
	output, _ := os.ReadFile(outPath)
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(output), 0
	case errors.As(err, &exit):
		return string(output), exit.ExitCode()
	default:
		t.Fatalf("running %s: %v\n%s", path, err, output)
		return "", 0
	}
}

func readTrimmed(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return strings.TrimSpace(string(b))
}

// Two leases in a row on one instance: each runs the agent with the
// controller's agent.jar (fetched again only when newer) and the node's
// name and secret, the secret through a private file that is gone with the
// agent, which the release stops. The end-to-end test in cmd/hangar runs it
// with a real java.
func TestJenkinsAgentBootstrap(t *testing.T) {
	dir := t.TempDir()
	file := func(name string) string { return filepath.Join(dir, name) }
	java := file("java")
	if err := os.WriteFile(java, []byte(stubJava), 0o700); err != nil {
		t.Fatal(err)
	}
	jars := &jarServer{}
	js := httptest.NewServer(jars)
	defer js.Close()
	master := js.URL + "/jenkins"

	assigned := func(lease, node string) string {
		return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", lease, "HANGAR_WORKER_NAME", node,
			"HANGAR_WORKER_PASSWORD", jenkinsSecret, "HANGAR_WORKER_MASTER", master,
			"HANGAR_WORKER_COMMAND", DefaultWorkerCommand("jenkins-agent.sh"))
	}
	srv := &protocolServer{t: t}
	srv.assign = func(n int, current string) string {
		switch n {
		case 1:
			return assigned("lease-1", "hangar-ci-node0001")
		case 2:
			waitForFile(t, file("1.args"))
			return answer("HANGAR_ASSIGNMENT", "released")
		case 3:
			return assigned("lease-2", "hangar-ci-node0002")
		case 4:
			waitForFile(t, file("2.args"))
			return answer("HANGAR_ASSIGNMENT", "released")
		default:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	script, err := BootstrapScript("jenkins-agent.sh")
	if err != nil {
		t.Fatal(err)
	}
	root := file("root")
	out, code := runScript(t, dir, script,
		"HANGAR_URL="+hs.URL, "HANGAR_POOL=ci", "HANGAR_BOOTSTRAP_TOKEN="+testToken, "HANGAR_SSH_HOST_KEY_FILE="+file("none"),
		"HANGAR_ROOT="+root, "JENKINS_AGENT_JAVA="+java, "JENKINS_AGENT_JAVA_OPTS=-Xmx256m  -Dx=y", "STUB_DIR="+dir)
	if code != 0 {
		t.Fatalf("exit code %d:\n%s", code, out)
	}
	t.Logf("output:\n%s", out)

	workDir := filepath.Join(root, "var", "lib", "jenkins-agent")
	mask := syscall.Umask(0)
	syscall.Umask(mask)
	for i, node := range []string{"hangar-ci-node0001", "hangar-ci-node0002"} {
		run := func(what string) string { return file(fmt.Sprintf("%d.%s", i+1, what)) }
		secretPath := readTrimmed(t, run("secret-path"))
		want := strings.Join([]string{"-Xmx256m", "-Dx=y", "-jar", filepath.Join(workDir, "agent.jar"), "-url", master + "/", "-name", node,
			"-secret", "@" + secretPath, "-webSocket", "-workDir", workDir}, "\n")
		if got := readTrimmed(t, run("args")); got != want {
			t.Errorf("run %d: java ran with\n%s\nwant\n%s", i+1, got, want)
		}
		if got := readTrimmed(t, run("secret")); got != jenkinsSecret {
			t.Errorf("run %d: the secret file held %q", i+1, got)
		}
		if got := readTrimmed(t, run("mode")); got != "600" {
			t.Errorf("run %d: secret file mode %s, want 600", i+1, got)
		}
		if _, err := os.Stat(secretPath); !os.IsNotExist(err) {
			t.Errorf("run %d: secret file left behind: %v", i+1, err)
		}
		if got := readTrimmed(t, run("password-in-env")); got != "0" {
			t.Errorf("run %d: the agent, and so its builds, got HANGAR_WORKER_PASSWORD", i+1)
		}
		if got := readTrimmed(t, run("umask")); got != fmt.Sprintf("%04o", mask) {
			t.Errorf("run %d: the agent runs with umask %s, want the %04o it was given", i+1, got, mask)
		}
	}
	if b, err := os.ReadFile(filepath.Join(workDir, "agent.jar")); err != nil || string(b) != "PK fake jar" {
		t.Errorf("agent.jar = %q, %v", b, err)
	}
	if got := jars.requests(); got != 2 {
		t.Errorf("%d agent.jar requests, want 2", got)
	}
	if got := strings.Count(out, "hangar-jenkins-agent: downloaded agent.jar from "+master+"/"); got != 1 {
		t.Errorf("agent.jar downloaded %d times, want once: the second lease's is current", got)
	}
	for _, secret := range []string{jenkinsSecret, testToken} {
		if strings.Contains(out, secret) {
			t.Error("the output shows a secret")
		}
	}
	for _, want := range []string{
		"hangar-jenkins-agent: using " + java,
		"hangar-jenkins-agent: connecting node hangar-ci-node0001 to " + master + "/",
		"hangar-bootstrap: worker for lease lease-1 stopped",
		"hangar-bootstrap: worker for lease lease-2 stopped",
		"hangar-bootstrap: Hangar asked this instance to terminate",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}

	// The agent script the boot wrote is itself clean.
	if shellcheck, err := exec.LookPath("shellcheck"); err == nil {
		if out, err := exec.Command(shellcheck, filepath.Join(workDir, ".hangar-agent.sh")).CombinedOutput(); err != nil {
			t.Errorf("shellcheck of the agent script: %v\n%s", err, out)
		}
	}
}

// bootAgentScript runs jenkins-agent.sh's own part, without generic.sh, as
// the boot does, and returns the agent script it wrote.
func bootAgentScript(t *testing.T, dir string, env ...string) string {
	t.Helper()
	own, err := Bootstrap.ReadFile("bootstrap/jenkins-agent.sh")
	if err != nil {
		t.Fatal(err)
	}
	out, code := runScript(t, dir, own, env...)
	if code != 0 {
		t.Fatalf("boot: exit code %d\n%s", code, out)
	}
	return filepath.Join(dir, "root", "var", "lib", "jenkins-agent", ".hangar-agent.sh")
}

func TestJenkinsAgentRefuses(t *testing.T) {
	jars := &jarServer{notFound: true}
	js := httptest.NewServer(jars)
	defer js.Close()
	tests := []struct {
		name     string
		env      []string
		wantExit int
		wantOut  string
	}{
		{"no master", nil, 2, "HANGAR_WORKER_MASTER is not set"},
		{"master not a URL", []string{"HANGAR_WORKER_MASTER=ci.example:9989"}, 2, "HANGAR_WORKER_MASTER is not a Jenkins root URL: ci.example:9989"},
		{"no agent.jar", []string{"HANGAR_WORKER_MASTER=" + js.URL + "/jenkins"}, 1, "downloading " + js.URL + "/jenkins/jnlpJars/agent.jar failed"},
		{"java gone since boot", []string{"HANGAR_WORKER_MASTER=" + js.URL + "/jenkins", "JENKINS_AGENT_JAVA=/nonexistent/java"}, 1,
			"/nonexistent/java is not installed; the agent needs a Java runtime (Debian: default-jre-headless)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			java := filepath.Join(dir, "java")
			if err := os.WriteFile(java, []byte(stubJava), 0o700); err != nil {
				t.Fatal(err)
			}
			base := []string{"HANGAR_ROOT=" + filepath.Join(dir, "root"), "JENKINS_AGENT_JAVA=" + java, "STUB_DIR=" + dir, "STUB_EXIT=0"}
			agent := bootAgentScript(t, dir, base...)
			script, err := os.ReadFile(agent)
			if err != nil {
				t.Fatal(err)
			}
			env := append(base, "HANGAR_WORKER_NAME=hangar-ci-x", "HANGAR_WORKER_PASSWORD="+jenkinsSecret)
			out, code := runScript(t, dir, script, append(env, tt.env...)...)
			if code != tt.wantExit || !strings.Contains(out, tt.wantOut) {
				t.Errorf("exit code %d (want %d), output lacks %q:\n%s", code, tt.wantExit, tt.wantOut, out)
			}
		})
	}

	// A controller down with a jar from an earlier lease at hand: that one.
	dir := t.TempDir()
	java := filepath.Join(dir, "java")
	if err := os.WriteFile(java, []byte(stubJava), 0o700); err != nil {
		t.Fatal(err)
	}
	env := []string{"HANGAR_ROOT=" + filepath.Join(dir, "root"), "JENKINS_AGENT_JAVA=" + java, "STUB_DIR=" + dir, "STUB_EXIT=0"}
	agent := bootAgentScript(t, dir, env...)
	if err := os.WriteFile(filepath.Join(filepath.Dir(agent), "agent.jar"), []byte("PK old"), 0o600); err != nil {
		t.Fatal(err)
	}
	script, _ := os.ReadFile(agent)
	out, code := runScript(t, dir, script, append(env, "HANGAR_WORKER_NAME=n", "HANGAR_WORKER_PASSWORD=s", "HANGAR_WORKER_MASTER="+js.URL+"/jenkins")...)
	if code != 0 || !strings.Contains(out, "downloading agent.jar failed; using the one from an earlier lease") {
		t.Errorf("exit code %d, output:\n%s", code, out)
	}

	// No java at boot on the local cloud: not ready, never installed.
	dir = t.TempDir()
	own, _ := Bootstrap.ReadFile("bootstrap/jenkins-agent.sh")
	out, code = runScript(t, dir, own, "HANGAR_ROOT="+filepath.Join(dir, "root"), "JENKINS_AGENT_JAVA=/nonexistent/java")
	if code != 1 || !strings.Contains(out, "/nonexistent/java is missing; on the local cloud install it on this machine yourself") {
		t.Errorf("boot without java: exit code %d, output:\n%s", code, out)
	}
}
