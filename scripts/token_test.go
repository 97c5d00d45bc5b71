package scripts

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http/httptest"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/shell"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/userdata"
)

func tokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// processTree returns root and every process descended from it.
func processTree(t *testing.T, root int) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	children := map[int][]int{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(fields) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(fields[1])
		children[ppid] = append(children[ppid], pid)
	}
	tree := []int{root}
	for i := 0; i < len(tree); i++ {
		tree = append(tree, children[tree[i]]...)
	}
	return tree
}

// environLeaks lists the processes of the tree under root whose environment
// holds one of secrets or a HANGAR_BOOTSTRAP_TOKEN variable at all.
func environLeaks(t *testing.T, root int, secrets ...string) []string {
	t.Helper()
	var leaks []string
	for _, pid := range processTree(t, root) {
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err != nil {
			continue // gone since
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		what := fmt.Sprintf("pid %d (%q)", pid, bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}))
		if bytes.Contains(env, []byte("HANGAR_BOOTSTRAP_TOKEN=")) {
			leaks = append(leaks, what+": HANGAR_BOOTSTRAP_TOKEN")
		}
		for _, s := range secrets {
			if bytes.Contains(env, []byte(s)) || bytes.Contains(cmdline, []byte(s)) {
				leaks = append(leaks, what+": a token")
			}
		}
	}
	return leaks
}

func waitForOutput(t *testing.T, path, want string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if b, _ := os.ReadFile(path); bytes.Contains(b, []byte(want)) {
			return
		}
	}
	t.Errorf("%s did not come to hold %q", path, want)
}

// The token is in no environment: not the bootstrap's own, nor the
// worker's, a run's or the cleanup command's. A released answer with a new
// token makes every later call carry it and never the old one, twice over.
// Then the instance is stopped and started: the user-data runs again with
// the original token and uses the saved one. A token file from another
// instance (baked into an image) is ignored.
func TestGenericTokenRotation(t *testing.T) {
	const tok2, tok3 = "tok_rotated-2", "tok_rotated-3"
	tokens := []string{testToken, tok2, tok3}
	dir := t.TempDir()
	file := func(name string) string { return filepath.Join(dir, name) }
	q := shell.Quote
	stateDir := file("var/lib/hangar")
	tokenFile := filepath.Join(stateDir, "bootstrap-token")

	worker := "echo $$ > " + q(file("worker.pid.tmp")) + " && mv " + q(file("worker.pid.tmp")) + " " + q(file("worker.pid")) + "; exec sleep 600"
	run := shellCommand("sh", "-c", `cat /proc/self/environ > "$0"; sleep 600 & echo $! > "$1"; sleep 0.3; echo ran`, file("run.environ"), file("run.child"))
	var leaksWorker, leaksRun []string
	var treeWorker, treeRun int
	srv := &protocolServer{t: t}
	srv.assign = func(n int, current string) string {
		switch {
		case n == 1:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-1", "HANGAR_WORKER_NAME", "worker-1",
				"HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "m:1", "HANGAR_WORKER_COMMAND", worker)
		case n == 2:
			waitForFile(t, file("worker.pid"))
			leaksWorker = environLeaks(t, srv.bootstrapPid(), tokens...)
			treeWorker = len(processTree(t, srv.bootstrapPid()))
			return answer("HANGAR_ASSIGNMENT", "released", "HANGAR_CLEANUP_COMMAND", "cat /proc/self/environ > "+q(file("cleanup.environ"))) +
				srv.rotate(tok2)
		case n == 3:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-2", "HANGAR_WORKER_NAME", "worker-2",
				"HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "", "HANGAR_WORKER_COMMAND", "",
				"HANGAR_RUN_ID", "1", "HANGAR_RUN_COMMAND", run)
		case n == 4:
			waitForFile(t, file("run.child"))
			leaksRun = environLeaks(t, srv.bootstrapPid(), tokens...)
			treeRun = len(processTree(t, srv.bootstrapPid()))
			return answer("HANGAR_ASSIGNMENT", "none")
		case n > 100:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		case current == "lease-2" && srv.saw("lease-2 1 0"):
			return answer("HANGAR_ASSIGNMENT", "released") + srv.rotate(tok3)
		case current == "" && n > 4:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		default:
			return answer("HANGAR_ASSIGNMENT", "none")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	t.Cleanup(func() {
		for _, f := range []string{"worker.pid", "run.child"} {
			if b, err := os.ReadFile(file(f)); err == nil {
				killPid(strings.TrimSpace(string(b)))
			}
		}
	})

	out, code := runGeneric(t, dir, hs)
	t.Logf("output:\n%s", out)
	if code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
	if got := strings.Count(out, "hangar-bootstrap: Hangar rotated the bootstrap token; saved the new one"); got != 2 {
		t.Errorf("%d rotations logged, want 2", got)
	}
	for _, tok := range tokens {
		if strings.Contains(out, tok) {
			t.Errorf("the output shows a token")
		}
	}
	for _, leak := range append(leaksWorker, leaksRun...) {
		t.Errorf("environment leak: %s", leak)
	}
	// The bootstrap and its worker; the bootstrap, the run's supervisor,
	// its upload (curl), the command and what it left running.
	if treeWorker < 2 || treeRun < 5 {
		t.Errorf("looked at %d processes during the lease and %d during the run; want at least 2 and 5", treeWorker, treeRun)
	}
	for _, f := range []string{"cleanup.environ", "run.environ"} {
		env, err := os.ReadFile(file(f))
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		for _, tok := range tokens {
			if bytes.Contains(env, []byte(tok)) || bytes.Contains(env, []byte("HANGAR_BOOTSTRAP_TOKEN")) {
				t.Errorf("%s holds a token", f)
			}
		}
	}

	srv.mu.Lock()
	if len(srv.refused) > 0 {
		t.Errorf("calls with a token Hangar no longer took: %q", srv.refused)
	}
	// Each call carries the newest token there is: never an older one
	// after a newer one.
	stage, order := 0, map[string]int{testToken: 0, tok2: 1, tok3: 2}
	seen := map[string]bool{}
	for _, c := range srv.calls {
		tok := c[strings.LastIndexByte(c, ' ')+1:]
		seen[tok] = true
		if order[tok] < stage {
			t.Errorf("call %q carries an older token after a newer one", c[:strings.LastIndexByte(c, ' ')])
		}
		stage = max(stage, order[tok])
	}
	if !seen[tok2] || !seen[tok3] {
		t.Errorf("calls carried tok2: %v, tok3: %v; want both", seen[tok2], seen[tok3])
	}
	if len(srv.exits) != 1 || srv.exits[0] != "lease-2 1 0" {
		t.Errorf("exits %q, want the run's, reported with the rotated token", srv.exits)
	}
	srv.mu.Unlock()

	if b, err := os.ReadFile(tokenFile); err != nil || string(b) != tokenHash(testToken)+" "+tok3+"\n" {
		t.Errorf("token file %q (%v), want the original's hash and the last token", b, err)
	}
	if st, err := os.Stat(tokenFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("token file: %v, %v; want mode 0600", st, err)
	}
	if st, err := os.Stat(stateDir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("state dir: %v, %v; want mode 0700", st, err)
	}
	if left, _ := filepath.Glob(filepath.Join(stateDir, ".bootstrap-token.*")); len(left) > 0 {
		t.Errorf("temporary token files left: %q", left)
	}

	// Stop and start: the user-data runs again, with the original token,
	// which Hangar no longer takes.
	script, err := BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	terminate := func(int, string) string { return answer("HANGAR_ASSIGNMENT", "terminate") }
	boot := func(accept string) (*protocolServer, string, int) {
		t.Helper()
		srv := &protocolServer{t: t, assign: terminate, script: script, token: accept}
		hs := httptest.NewServer(srv)
		defer hs.Close()
		ud, err := userdata.Render(userdata.Params{Pool: "demo", HangarURL: hs.URL, BootstrapToken: testToken})
		if err != nil {
			t.Fatal(err)
		}
		path := file("user-data")
		if err := os.WriteFile(path, ud, 0o700); err != nil {
			t.Fatal(err)
		}
		out, code := runBootstrap(t, dir, hs, []string{"HANGAR_USERDATA_CLOUD_DIR="}, path)
		return srv, out, code
	}
	srv2, out, code := boot(tok3)
	if code != 0 || !strings.Contains(out, "hangar-userdata: using the bootstrap token saved by an earlier boot") ||
		!strings.Contains(out, "hangar-bootstrap: Hangar asked this instance to terminate") {
		t.Errorf("after a stop and start: exit code %d, output:\n%s", code, out)
	}
	if len(srv2.refused) > 0 || srv2.callsWith(tok3) < 3 {
		t.Errorf("after a stop and start: refused %q; %d calls with the saved token, want script, ready, assignment", srv2.refused, srv2.callsWith(tok3))
	}
	if b, _ := os.ReadFile(tokenFile); string(b) != tokenHash(testToken)+" "+tok3+"\n" {
		t.Errorf("token file %q after a stop and start", b)
	}

	// A token file of another instance, baked into the image this one
	// was made from: its token is not for this instance.
	if err := os.WriteFile(tokenFile, []byte(tokenHash("tok_another-instance")+" "+tok3+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv3, out, code := boot(testToken)
	if code != 0 || strings.Contains(out, "using the bootstrap token saved") || len(srv3.refused) > 0 || srv3.callsWith(testToken) < 3 {
		t.Errorf("with another instance's token file: exit code %d, refused %q, output:\n%s", code, srv3.refused, out)
	}
	if b, _ := os.ReadFile(tokenFile); string(b) != tokenHash(testToken)+" "+testToken+"\n" {
		t.Errorf("token file %q, want this instance's own token", b)
	}
}

// The script runs itself again only once, and only from a file.
func TestGenericReexec(t *testing.T) {
	dir := t.TempDir()
	script, err := BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	srv := &protocolServer{t: t, assign: func(int, string) string { return answer("HANGAR_ASSIGNMENT", "terminate") }}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	path := filepath.Join(dir, "generic.sh")
	if err := os.WriteFile(path, script, 0o700); err != nil {
		t.Fatal(err)
	}
	// A marker of another process, without a token: refused, not looped.
	out, code := runBootstrap(t, dir, hs, []string{"HANGAR_BOOTSTRAP_REEXEC=1"}, path)
	if code != 1 || !strings.Contains(out, "HANGAR_BOOTSTRAP_TOKEN is not set") {
		t.Errorf("without a token: exit code %d, output:\n%s", code, out)
	}
	// From bash -c there is no file to run again.
	out, code = runBootstrap(t, dir, hs, []string{"HANGAR_BOOTSTRAP_TOKEN=" + testToken}, "-c", string(script))
	if code != 1 || !strings.Contains(out, "run this script from a file") {
		t.Errorf("from bash -c: exit code %d, output:\n%s", code, out)
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if len(srv.calls) > 0 {
		t.Errorf("calls %q", srv.calls)
	}
}

// A run's command is executed with exec --: a first word starting with a
// dash is a command name, not an option of exec (exec -a NAME would run
// "echo hi" under another name).
func TestGenericRunExecDashes(t *testing.T) {
	dir := t.TempDir()
	srv := &protocolServer{t: t}
	srv.assign = func(n int, current string) string {
		switch {
		case n == 1:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-1",
				"HANGAR_RUN_ID", "1", "HANGAR_RUN_COMMAND", shellCommand("-a", "fake", "echo", "hi"))
		case srv.saw("lease-1 1 127") || n > 100:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		default:
			return answer("HANGAR_ASSIGNMENT", "none")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	out, code := runGeneric(t, dir, hs)
	got := srv.runOutput("lease-1", "1")
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if code != 0 || len(srv.exits) != 1 || srv.exits[0] != "lease-1 1 127" {
		t.Errorf("exit code %d, exits %q; want the run's status 127\n%s", code, srv.exits, out)
	}
	if strings.Contains(got, "hi") || !strings.Contains(got, "-a: not found") {
		t.Errorf("run output %q, want exec's complaint that there is no command -a", got)
	}
}

// worker_user: the run's command, the cleanup command and the worker run as
// that user (nobody here; tests never create users), who can read neither
// the token file nor the bootstrap's environment.
func TestGenericWorkerUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, as worker_user does")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skip("no user nobody")
	}
	testutil.NeedTool(t, "setpriv", "runs the worker as worker_user: apt-get install util-linux")
	// Not t.TempDir(), whose parent only root may enter: here only the
	// token's own directory and file keep nobody out.
	dir, err := os.MkdirTemp("", "hangar-worker-user-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	file := func(name string) string { return filepath.Join(dir, name) }
	if err := os.WriteFile(file("control"), []byte("readable\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tokenFile := file("var/lib/hangar/bootstrap-token")

	probe := `id -un
echo "HOME=$HOME USER=$USER LOGNAME=$LOGNAME PWD=$PWD"
echo "control $(cat "$0")"
if cat "$1" >/dev/null 2>&1; then echo token file readable; else echo token file unreadable; fi
if cat /proc/"$2"/environ >/dev/null 2>&1; then echo bootstrap environ readable; else echo bootstrap environ unreadable; fi
if tr '\0' '\n' </proc/self/environ | grep -q '^HANGAR_BOOTSTRAP_TOKEN='; then echo token in environ; fi`
	srv := &protocolServer{t: t}
	srv.assign = func(n int, current string) string {
		switch {
		case n == 1:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_WORKER_USER", "nobody", "HANGAR_LEASE_ID", "lease-1",
				"HANGAR_RUN_ID", "1", "HANGAR_RUN_COMMAND", shellCommand("bash", "-c", probe, file("control"), tokenFile, strconv.Itoa(srv.bootstrapPid())))
		case n > 100:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		case current == "lease-1" && srv.saw("lease-1 1 0"):
			return answer("HANGAR_ASSIGNMENT", "released", "HANGAR_WORKER_USER", "nobody",
				"HANGAR_CLEANUP_COMMAND", `echo "cleanup as $(id -un) in $PWD"`) + srv.rotate("tok_rotated-2")
		case current == "" && srv.saw("lease-1 1 0") && !strings.Contains(readFile(file("output")), "worker as"):
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_WORKER_USER", "nobody", "HANGAR_LEASE_ID", "lease-2",
				"HANGAR_WORKER_NAME", "w2", "HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "m:1",
				"HANGAR_WORKER_COMMAND", `echo "worker as $(id -un) HOME=$HOME"; exec sleep 600`)
		case current == "lease-2":
			waitForOutput(t, file("output"), "worker as")
			return answer("HANGAR_ASSIGNMENT", "released")
		case current == "":
			return answer("HANGAR_ASSIGNMENT", "terminate")
		default:
			return answer("HANGAR_ASSIGNMENT", "none")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	script, err := BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file("generic.sh"), script, 0o700); err != nil {
		t.Fatal(err)
	}
	out, code := runBootstrap(t, dir, hs, []string{"HANGAR_BOOTSTRAP_TOKEN=" + testToken}, file("generic.sh"))
	t.Logf("output:\n%s", out)
	if code != 0 {
		t.Errorf("exit code %d", code)
	}
	want := fmt.Sprintf("nobody\nHOME=%s USER=nobody LOGNAME=nobody PWD=%s\ncontrol readable\ntoken file unreadable\nbootstrap environ unreadable\n",
		nobody.HomeDir, map[bool]string{true: nobody.HomeDir, false: "/"}[isDir(nobody.HomeDir)])
	if got := srv.runOutput("lease-1", "1"); got != want {
		t.Errorf("run output:\n%s\nwant:\n%s", got, want)
	}
	for _, want := range []string{"cleanup as nobody in ", "worker as nobody HOME=" + nobody.HomeDir, "hangar-bootstrap: worker for lease lease-2 stopped"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if len(srv.refused) > 0 {
		t.Errorf("refused calls %q", srv.refused)
	}
}

// worker_user needs the bootstrap to run as root: otherwise a run exits
// 126 with the reason in its output, and the worker is reported exited
// 126, never started.
func TestGenericWorkerUserNeedsRoot(t *testing.T) {
	var cred *syscall.Credential
	dir := t.TempDir()
	if os.Geteuid() == 0 {
		// Run the bootstrap as nobody, in a directory of its own.
		nobody, err := user.Lookup("nobody")
		if err != nil {
			t.Skip("no user nobody to run the bootstrap as")
		}
		uid, _ := strconv.Atoi(nobody.Uid)
		gid, _ := strconv.Atoi(nobody.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if dir, err = os.MkdirTemp("", "hangar-not-root-"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(dir) })
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	srv := &protocolServer{t: t}
	srv.assign = func(n int, current string) string {
		switch {
		case n == 1:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_WORKER_USER", "builder", "HANGAR_LEASE_ID", "lease-1",
				"HANGAR_RUN_ID", "1", "HANGAR_RUN_COMMAND", shellCommand("touch", filepath.Join(dir, "ran")))
		case current == "lease-1" && srv.saw("lease-1 1 126"):
			return answer("HANGAR_ASSIGNMENT", "released", "HANGAR_WORKER_USER", "builder",
				"HANGAR_CLEANUP_COMMAND", shellCommand("touch", filepath.Join(dir, "cleaned")))
		case current == "" && srv.saw("lease-1 1 126") && !srv.sawHeartbeat("lease-2 exited 126"):
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_WORKER_USER", "builder", "HANGAR_LEASE_ID", "lease-2",
				"HANGAR_WORKER_NAME", "w2", "HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "m:1",
				"HANGAR_WORKER_COMMAND", shellCommand("touch", filepath.Join(dir, "worked")))
		case srv.sawHeartbeat("lease-2 exited 126") || n > 100:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		default:
			return answer("HANGAR_ASSIGNMENT", "none")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	script, err := BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "generic.sh")
	if err := os.WriteFile(path, script, 0o755); err != nil {
		t.Fatal(err)
	}
	out, code := runBootstrapAs(t, cred, dir, hs, []string{"HANGAR_BOOTSTRAP_TOKEN=" + testToken}, path)
	t.Logf("output:\n%s", out)
	refusal := "worker_user is builder, but this bootstrap runs as uid "
	if code != 0 || strings.Count(out, refusal) != 2 {
		t.Errorf("exit code %d; want 0, and the refusal for the worker and the cleanup", code)
	}
	if got := srv.runOutput("lease-1", "1"); !strings.Contains(got, refusal) {
		t.Errorf("run output %q lacks the refusal", got)
	}
	for _, f := range []string{"ran", "cleaned", "worked"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			t.Errorf("a command ran (%s) though it could not run as worker_user", f)
		}
	}
	if !srv.sawHeartbeat("lease-2 exited 126") {
		t.Error("no heartbeat reported the worker exited 126")
	}
}

// saw reports whether a run's exit "lease run exit_code" was reported.
func (s *protocolServer) saw(exit string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.exits {
		if e == exit {
			return true
		}
	}
	return false
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

func isDir(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.IsDir()
}
