package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// fullPool serves a pool of one instance and leases it, so that the next
// lease waits.
func fullPool(t *testing.T) *testServer {
	t.Helper()
	ts := startTest(t, testTOML(t.TempDir(), "demo", "max_instances = 1"), nil)
	ts.lease(t, api.LeaseRequest{Pool: "demo"})
	return ts
}

// leaseIn finds the lease id hangar lease or run named in its message.
var leaseIn = regexp.MustCompile(`lease (l-[0-9A-Za-z_-]+)`)

func leaseState(t *testing.T, ts *testServer, id string) pool.LeaseState {
	t.Helper()
	v, err := ts.client.GetLease(t.Context(), id, 0)
	if err != nil {
		t.Fatalf("lease %s: %v", id, err)
	}
	return v.State
}

// When --wait runs out, hangar lease cancels the lease it made and exits
// 75 with one line on stderr; --keep-pending leaves it queued.
func TestLeaseWaitRunsOut(t *testing.T) {
	ts := fullPool(t)
	srv := "--server=" + ts.url

	code, out, errOut := runCLI(t, srv, "lease", "demo", "--wait", "1s")
	m := leaseIn.FindStringSubmatch(errOut)
	if code != 75 || out != "" || m == nil || strings.Count(errOut, "\n") != 1 ||
		!strings.HasPrefix(errOut, "hangar: no instance of pool demo within 1s; lease "+m[1]+" canceled") {
		t.Fatalf("exit %d\nstdout %q\nstderr %q", code, out, errOut)
	}
	if st := leaseState(t, ts, m[1]); st != pool.LeaseCanceled {
		t.Errorf("lease %s is %s after the wait ran out, want canceled", m[1], st)
	}

	code, out, errOut = runCLI(t, srv, "lease", "demo", "--wait", "1s", "--keep-pending")
	m = leaseIn.FindStringSubmatch(out)
	if code != 0 || m == nil || !strings.Contains(out, "still pending") {
		t.Fatalf("--keep-pending: exit %d\nstdout %q\nstderr %q", code, out, errOut)
	}
	if st := leaseState(t, ts, m[1]); st != pool.LeasePending {
		t.Errorf("--keep-pending left lease %s %s, want pending", m[1], st)
	}
	if _, err := ts.client.GetLease(t.Context(), m[1], 0); err != nil {
		t.Fatal(err)
	}
	if err := ts.client.Release(t.Context(), m[1], false); err != nil {
		t.Fatal(err)
	}
}

// startWaiting starts the hangar binary on args and returns once the
// server holds a pending lease for it.
func startWaiting(t *testing.T, ts *testServer, args ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(hangarBinary(t), append([]string{"--server=" + ts.url}, args...)...)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }) // ended already unless the test failed
	testutil.Eventually(t, "a pending lease", 30*time.Second, func() bool {
		list, err := ts.client.Leases(t.Context(), "demo", pool.LeasePending)
		return err == nil && len(list) == 1
	})
	return cmd, &stderr
}

// Ctrl-C while hangar lease waits cancels the lease; so it does for hangar
// run, which says so rather than speak of an instance it never had.
func TestInterruptedWhileWaiting(t *testing.T) {
	ts := fullPool(t)
	for _, args := range [][]string{
		{"lease", "demo", "--wait", "10m"},
		{"run", "demo", "--wait", "10m", "--", "true"},
	} {
		t.Run(args[0], func(t *testing.T) {
			cmd, stderr := startWaiting(t, ts, args...)
			if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
				t.Fatal(err)
			}
			err := cmd.Wait()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 130 {
				t.Errorf("ended with %v, want exit status 130", err)
			}
			note := stderr.String()
			m := leaseIn.FindStringSubmatch(note)
			if m == nil || !strings.Contains(note, "interrupted by SIGINT while waiting for an instance of pool demo; lease "+m[1]+" canceled") ||
				strings.Contains(note, "discarded") {
				t.Fatalf("stderr: %q", note)
			}
			if st := leaseState(t, ts, m[1]); st != pool.LeaseCanceled {
				t.Errorf("lease %s is %s after Ctrl-C, want canceled", m[1], st)
			}
		})
	}
}

// On a terminal, hangar lease shows how its wait stands; script(1) gives
// it one.
func TestLeaseProgressOnATerminal(t *testing.T) {
	testutil.NeedTool(t, "script", "apt-get install util-linux")
	ts := fullPool(t)
	line := hangarBinary(t) + " --server=" + ts.url + " lease demo --wait 3s"
	out, err := exec.Command("script", "-qec", line, "/dev/null").CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 75 {
		t.Errorf("ended with %v, want exit status 75", err)
	}
	if !regexp.MustCompile(`\r\x1b\[Kwaiting for pool demo: no instance booting, 0 ahead of you, \d+s`).Match(out) {
		t.Errorf("no progress line on the terminal:\n%q", out)
	}
	if !bytes.Contains(out, []byte("\r\x1b[Khangar: no instance of pool demo within 3s")) {
		t.Errorf("the progress line is not erased before the message:\n%q", out)
	}
}

// A run-time scale outlives restarts over the config, says so, and --reset
// drops it.
func TestScaleOverridesConfigUntilReset(t *testing.T) {
	dataDir := t.TempDir()
	serve := func(max string) (*testServer, string) {
		ts := startTest(t, testTOML(dataDir, "demo", "max_instances = "+max), nil)
		return ts, "--server=" + ts.url
	}
	pools := func(srv string) string {
		t.Helper()
		code, out, errOut := runCLI(t, srv, "pools")
		if code != 0 {
			t.Fatalf("pools: %d %s", code, errOut)
		}
		return out
	}
	ts, srv := serve("3")
	if code, out, errOut := runCLI(t, srv, "scale", "demo", "--max", "2"); code != 0 || !strings.Contains(out, "max_instances 2 (scaled; config 3)") {
		t.Fatalf("scale: %d %q %q", code, out, errOut)
	}
	if out := pools(srv); !strings.Contains(out, "2 (scaled; config 3)") {
		t.Errorf("pools after scale:\n%s", out)
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}

	// The config now says 5: the override still wins, and the log says why.
	ts, srv = serve("5")
	if out := pools(srv); !strings.Contains(out, "2 (scaled; config 5)") {
		t.Errorf("pools after a restart with an edited config:\n%s", out)
	}
	if logs := ts.logs.String(); !strings.Contains(logs, "hangar scale demo --reset") || !strings.Contains(logs, "config_max_instances=5") {
		t.Errorf("the start does not log the override:\n%s", logs)
	}
	var p []pool.PoolView
	if code, out, _ := runCLI(t, srv, "pools", "-o", "json"); code != 0 || json.Unmarshal([]byte(out), &p) != nil ||
		len(p) != 1 || !p[0].Scaled || p[0].Config == nil || p[0].Config.MaxInstances != 5 || p[0].MaxInstances != 2 {
		t.Errorf("pools -o json: %s", out)
	}
	if code, out, errOut := runCLI(t, srv, "scale", "demo", "--reset"); code != 0 || !strings.Contains(out, "max_instances 5\n") {
		t.Fatalf("scale --reset: %d %q %q", code, out, errOut)
	}
	if out := pools(srv); strings.Contains(out, "scaled") {
		t.Errorf("pools after --reset:\n%s", out)
	}
	if code, _, errOut := runCLI(t, srv, "scale", "demo", "--reset", "--max", "1"); code == 0 || !strings.Contains(errOut, "without --min-idle and --max") {
		t.Errorf("scale --reset --max: %d %q", code, errOut)
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	ts, srv = serve("5")
	if out := pools(srv); strings.Contains(out, "scaled") || !strings.Contains(out, " 5 ") {
		t.Errorf("pools after --reset and a restart:\n%s", out)
	}
	if strings.Contains(ts.logs.String(), "override the config") {
		t.Errorf("an override logged after --reset:\n%s", ts.logs.String())
	}
}

// Every relative path of a config file is relative to the file: another
// working directory finds the same local cloud.
func TestDataDirRelativeToTheConfig(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "hangar.toml")
	writeFile(t, cfgPath, testTOML("state", "demo", "min_idle = 1"))
	t.Chdir(t.TempDir()) // anywhere else
	cfg, err := loadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "state"); cfg.Server.DataDir != want {
		t.Fatalf("data_dir = %q, want %q", cfg.Server.DataDir, want)
	}
	s, err := startServer(t.Context(), cfg, serveOptions{Logger: slog.New(slog.DiscardHandler), Tick: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { terminateAll(t, filepath.Join(dir, "state", "local")) })
	ts := &testServer{server: s, client: &api.Client{BaseURL: s.url}}
	testutil.Eventually(t, "an idle instance", 30*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 1 })
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	t.Chdir(t.TempDir()) // and yet elsewhere
	code, out, errOut := runCLI(t, "local", "terminate-all", "--config", cfgPath)
	if code != 0 || out != "terminated 1 instances\n" {
		t.Errorf("local terminate-all from elsewhere: %d %q %q", code, out, errOut)
	}
}

// A config with providers and no pools serves (and says it has nothing to
// lease) and is a config for staging.
func TestNoPools(t *testing.T) {
	dir := t.TempDir()
	text := "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"" + filepath.Join(dir, "data") + "\"\n[providers.local]\ntype = \"local\"\n"
	path := filepath.Join(dir, "hangar.toml")
	writeFile(t, path, text)
	if code, out, errOut := runCLI(t, "config", "check", path); code != 0 || !strings.Contains(out, "ok (1 providers, 0 pools)") {
		t.Errorf("config check: %d %q %q", code, out, errOut)
	}
	ts := startTest(t, text, nil)
	if !strings.Contains(ts.logs.String(), "the config has no pools") {
		t.Errorf("no warning:\n%s", ts.logs.String())
	}
	code, _, errOut := runCLI(t, "--server="+ts.url, "lease", "demo", "--wait", "0s")
	if code != 1 || !strings.Contains(errOut, `unknown pool "demo": the config has no pools`) {
		t.Errorf("lease with no pools: %d %q", code, errOut)
	}
}

// Errors that say what to do next.
func TestErrorsSayWhatToDo(t *testing.T) {
	cfg := testTOML(t.TempDir(), "demo", "") + "\n[pools.linux]\nprovider = \"local\"\n"
	cfg = strings.Replace(cfg, "[providers.local]", "[[server.tokens]]\nname = \"ci\"\nrole = \"admin\"\ntoken = \"s3cret-admin-token-0123456789\"\n\n[providers.local]", 1)
	ts := startTest(t, cfg, nil)
	srv := "--server=" + ts.url
	cases := []struct {
		args []string
		want string
	}{
		{[]string{srv, "pools"}, "missing bearer token (give an API token with --token or HANGAR_TOKEN)"},
		{[]string{srv, "--token", "wrong", "pools"}, "invalid bearer token (give an API token with --token or HANGAR_TOKEN)"},
		{[]string{srv, "--token", "s3cret-admin-token-0123456789", "lease", "nope"}, `unknown pool "nope" (pools: demo, linux)`},
		{[]string{srv, "--token", "s3cret-admin-token-0123456789", "scale", "nope", "--max", "1"}, `unknown pool "nope" (pools: demo, linux)`},
	}
	for _, c := range cases {
		code, _, errOut := runCLI(t, c.args...)
		if code == 0 || !strings.Contains(errOut, c.want) {
			t.Errorf("hangar %s: exit %d, stderr %q; want %q", strings.Join(c.args[1:], " "), code, errOut, c.want)
		}
	}
}

// hangar version, /healthz?verbose and hangar_build_info name one build.
func TestVersion(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	code, out, errOut := runCLI(t, "version", "-o", "json")
	var b api.BuildInfo
	if code != 0 || json.Unmarshal([]byte(out), &b) != nil || b.Version == "" || b.Commit == "" || !strings.HasPrefix(b.GoVersion, "go") {
		t.Fatalf("version -o json: %d %q %q", code, out, errOut)
	}
	if _, out, _ := runCLI(t, "version"); out != "hangar "+b.Version+" (commit "+b.Commit+", "+b.GoVersion+")\n" {
		t.Errorf("version: %q", out)
	}
	get := func(path string) string {
		resp, err := http.Get(ts.url + path)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
		}
		return string(body)
	}
	if got := get("/healthz"); got != "ok\n" {
		t.Errorf("/healthz: %q", got)
	}
	var health struct {
		Status string        `json:"status"`
		Build  api.BuildInfo `json:"build"`
	}
	if err := json.Unmarshal([]byte(get("/healthz?verbose")), &health); err != nil || health.Status != "ok" || health.Build != b {
		t.Errorf("/healthz?verbose: %+v %v; want %+v", health, err, b)
	}
	metric := `hangar_build_info{commit="` + b.Commit + `",goversion="` + b.GoVersion + `",version="` + b.Version + `"} 1`
	if m := get("/metrics"); !strings.Contains(m, metric) {
		t.Errorf("/metrics lacks %s", metric)
	}
}

// Cobra's shell completion, which the README documents.
func TestCompletion(t *testing.T) {
	for _, shell := range []string{"bash", "zsh", "fish"} {
		code, out, errOut := runCLI(t, "completion", shell)
		if code != 0 || !strings.Contains(out, "hangar") || len(out) < 1000 {
			t.Errorf("completion %s: %d %q", shell, code, errOut)
		}
	}
}

// release -o json prints the lease as it ended.
func TestReleaseJSON(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	l := ts.lease(t, api.LeaseRequest{Pool: "demo"})
	code, out, errOut := runCLI(t, "--server="+ts.url, "release", l.ID, "-o", "json")
	var v pool.LeaseView
	if code != 0 || json.Unmarshal([]byte(out), &v) != nil || v.ID != l.ID || v.State != pool.LeaseReleased {
		t.Fatalf("release -o json: %d %q %q", code, out, errOut)
	}
}

// -o json names every field as the API does (snake_case), never as Go
// does: every type the CLI prints as JSON, walked field by field.
func TestJSONFieldNames(t *testing.T) {
	snake := regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)
	seen := map[reflect.Type]bool{}
	var walk func(path string, ty reflect.Type)
	walk = func(path string, ty reflect.Type) {
		for ty.Kind() == reflect.Pointer || ty.Kind() == reflect.Slice || ty.Kind() == reflect.Map {
			ty = ty.Elem()
		}
		if ty.Kind() != reflect.Struct || seen[ty] || ty == reflect.TypeFor[time.Time]() {
			return
		}
		seen[ty] = true
		for f := range ty.Fields() {
			if !f.IsExported() {
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			switch {
			case name == "-":
				continue
			case f.Anonymous && name == "":
				walk(path, f.Type) // inlined
				continue
			case !snake.MatchString(name):
				t.Errorf("%s.%s is %q in JSON, not snake_case", path, f.Name, name)
			}
			walk(path+"."+f.Name, f.Type)
		}
	}
	for _, v := range []any{pool.LeaseView{}, pool.PoolView{}, pool.InstanceView{}, pool.CacheSnapshotView{},
		api.ImageAnswer{}, api.BuildInfo{}, staging.Server{}, staging.Volume{}, cloud.Snapshot{}, cloud.Image{}} {
		ty := reflect.TypeOf(v)
		walk(ty.String(), ty)
	}
}

// A store left where a relative data_dir used to point (the working
// directory) stops serve from starting afresh beside it.
func TestOldDataDirRefused(t *testing.T) {
	dir, work := t.TempDir(), t.TempDir()
	cfgPath := filepath.Join(dir, "hangar.toml")
	writeFile(t, cfgPath, testTOML("state", "demo", ""))
	t.Chdir(work)
	if err := os.MkdirAll(filepath.Join(work, "state"), 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(work, "state", "hangar.db"), "")
	cfg, err := loadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	_, err = startServer(t.Context(), cfg, serveOptions{Logger: slog.New(slog.DiscardHandler)})
	if err == nil || !strings.Contains(err.Error(), "but the store is in "+filepath.Join(work, "state")) {
		t.Fatalf("serve beside an old store: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state")); !os.IsNotExist(err) {
		t.Errorf("serve made the new data_dir anyway: %v", err)
	}
}
