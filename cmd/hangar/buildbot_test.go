package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// Debian's Buildbot: its entry points run /usr/bin/python3, whatever python3
// comes first on PATH.
const (
	systemPython   = "/usr/bin/python3"
	buildbotBin    = "/usr/bin/buildbot"
	buildbotWorker = "/usr/bin/buildbot-worker"
)

// requireBuildbot skips unless Debian's buildbot and buildbot-worker, and an
// HTTP client for Buildbot's httpclientservice, are installed.
func requireBuildbot(t *testing.T) {
	t.Helper()
	testutil.NeedTools(t, "a real Buildbot master leases from Hangar; apt-get install buildbot buildbot-worker", systemPython, buildbotBin, buildbotWorker)
	check := "import buildbot, buildbot_worker\ntry:\n import txrequests\nexcept ImportError:\n import treq"
	if out, err := exec.Command(systemPython, "-c", check).CombinedOutput(); err != nil {
		testutil.ToolMissing(t, "Buildbot cannot be imported (apt-get install buildbot buildbot-worker): %v\n%s", err, out)
	}
}

// TestHangarBuildbotModule checks the module under Debian's Buildbot: it
// imports, HangarLatentWorker is an AbstractLatentWorker with the
// documented signature, and bad configurations are refused with messages
// that say what is wrong.
func TestHangarBuildbotModule(t *testing.T) {
	requireBuildbot(t)
	check := `
import inspect, sys
sys.path.insert(0, sys.argv[1])
from buildbot.config.errors import capture_config_errors
from buildbot.worker import AbstractLatentWorker
from hangar_buildbot import HangarLatentWorker, parse_duration

assert issubclass(HangarLatentWorker, AbstractLatentWorker)
params = inspect.signature(HangarLatentWorker.checkConfig).parameters
for name, default in [("password", None), ("token", None), ("wait", "10m"), ("discard", False)]:
    assert params[name].default == default, (name, params[name].default)
for name in ("hangar_url", "pool"):
    assert name in params, name
assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90 and parse_duration(2.5) == 2.5

def errors(*args, **kwargs):
    with capture_config_errors(raise_on_error=False) as errs:
        HangarLatentWorker(*args, **kwargs)
    return "\n".join(errs.errors)

assert errors("w1", hangar_url="http://127.0.0.1:7878", pool="p") == "", errors("w1", hangar_url="http://127.0.0.1:7878", pool="p")
for args, kwargs, want in [
    (("w1",), {"pool": "p"}, "hangar_url must be Hangar's http:// or https:// URL, got None"),
    (("w1",), {"hangar_url": "ftp://x", "pool": "p"}, "hangar_url must be Hangar's http:// or https:// URL"),
    (("w1",), {"hangar_url": "http://h"}, "pool must name a Hangar pool"),
    (("w1",), {"hangar_url": "http://h", "pool": "p", "wait": "ten minutes"}, "wait: 'ten minutes' is not a duration"),
    (("w1",), {"hangar_url": "http://h", "pool": "p", "wait": "0s"}, "wait must be more than 0s"),
    (("w1",), {"hangar_url": "http://h", "pool": "p", "discard": "yes"}, "discard must be True or False"),
    (("w1",), {"hangar_url": "http://h", "pool": "p", "token": 5}, "token must be a string or a util.Secret, got int"),
    (("_w",), {"hangar_url": "http://h", "pool": "p"}, "Hangar needs a worker name"),
]:
    got = errors(*args, **kwargs)
    assert want in got, (args, kwargs, got)
print("ok")
`
	cmd := exec.Command(systemPython, "-c", check, filepath.Join("..", "..", "ci", "buildbot"))
	cmd.Env = noBytecode()
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("checking hangar_buildbot.py: %v\n%s", err, out)
	}
}

// A Buildbot master running ci/buildbot/master.cfg.example (the README's)
// builds on instances leased from a local-cloud pool: the first build on a
// cold instance, the second on the same instance, warm, after the first
// lease was released at build_wait_timeout. Workers on a pool Hangar does not have, or cannot
// launch in, fail their substantiations with Hangar's message.
func TestBuildbotLatentWorker(t *testing.T) {
	requireBuildbot(t)
	const token = "tok_buildbot-e2e-0123456789"
	dir := t.TempDir()
	ts := startTestWith(t, fmt.Sprintf(`
[server]
listen = "127.0.0.1:0"
data_dir = %q
reconcile_interval = "1s"

[[server.tokens]]
name = "buildbot"
role = "lease"
token = %q

# A cloud's boot takes longer than a process's: cold and warm differ by it.
[providers.local]
type = "local"
boot_delay = "1s"

[pools.buildbot]
provider = "local"
min_idle = 0
max_instances = 2
idle_ttd = "5m"
boot_timeout = "2m"
bootstrap = "builtin:buildbot-worker.sh"
# Short, so that the worker's renewals are what keeps its leases alive.
lease_ttl = "2s"

# Its launches fail: this cloud has no such image.
[pools.broken]
provider = "local"
min_idle = 0
max_instances = 1
image = "ami-0123456789abcdef0"
bootstrap = "builtin:buildbot-worker.sh"
`, filepath.Join(dir, "hangar"), token), serveOptions{})
	ts.client.Token = token
	ctx := context.Background()

	m := startBuildbotMaster(t, filepath.Join(dir, "master"), ts.url, token)

	// Cold: the pool has no instance until the build asks for one.
	if n := len(ts.instances(t, "buildbot")); n != 0 {
		t.Fatalf("pool bb has %d instances before any build", n)
	}
	sent := time.Now()
	m.sendchange(t, "main", "1")
	first := m.mustSucceed(t, ts, "where", 1)
	coldStart := first.started.Sub(sent)
	t.Logf("cold: sendchange to build step start %s (instance %s, lease %s)", coldStart.Round(time.Millisecond), first.instance, first.lease)

	// build_wait_timeout (3s) after the build the lease is released and the
	// instance is idle again, not discarded.
	waitReleased(t, ts, first.lease, "after build_wait_timeout")
	testutil.Eventually(t, "instance "+first.instance+" to be idle again", 30*time.Second, func() bool {
		return ts.countState(t, "buildbot", pool.Idle) == 1
	})
	t.Logf("lease released %s after the build finished", time.Since(first.finished).Round(time.Millisecond))
	if !strings.Contains(ts.logs.String(), "/v1/leases/"+first.lease+"/renew") {
		t.Errorf("lease %s outlived its 2s TTL without a renew", first.lease)
	}

	// Warm: the same instance, a new lease, a new password.
	sent = time.Now()
	m.sendchange(t, "main", "2")
	second := m.mustSucceed(t, ts, "where", 2)
	warmStart := second.started.Sub(sent)
	t.Logf("warm: sendchange to build step start %s (instance %s, lease %s)", warmStart.Round(time.Millisecond), second.instance, second.lease)
	t.Logf("sendchange to build start: cold %s, warm %s", coldStart.Round(time.Millisecond), warmStart.Round(time.Millisecond))
	if second.instance != first.instance {
		t.Errorf("second build ran on %s, want the warm instance %s", second.instance, first.instance)
	}
	if second.lease == first.lease || second.password == first.password {
		t.Errorf("second build reused lease %s or its password; want a new lease and password", first.lease)
	}

	// A build that breaks its worker (it dies mid-build) gets the
	// instance discarded; Buildbot retries the build on a new one.
	m.sendchange(t, "break", "3")
	if b := m.waitBuild(t, ts, "breaker", 1); b.results == nil || *b.results == 0 {
		t.Fatalf("the build that killed its worker finished with results %v; want a failure", b.results)
	}
	third := m.mustSucceed(t, ts, "breaker", 2)
	if third.instance == second.instance {
		t.Errorf("the retried build ran on %s, the instance whose worker died", third.instance)
	}
	testutil.Eventually(t, "instance "+second.instance+", whose worker died, to be discarded", 30*time.Second, func() bool {
		for _, in := range ts.instances(t, "buildbot") {
			if in.ID == second.instance {
				return in.State == pool.Terminating
			}
		}
		return true
	})
	if !strings.Contains(ts.logs.String(), "lease="+second.lease+" state=released discard=true") {
		t.Errorf("lease %s was not released with discard", second.lease)
	}

	// Workers whose pool Hangar does not have, or cannot launch in, fail
	// their substantiations with Hangar's message. (Not earlier: Buildbot
	// starts no other build while a substantiation waits.)
	m.sendchange(t, "nopool", "3")
	m.sendchange(t, "broken", "3")
	for _, want := range []string{
		`leasing an instance of pool missing: unknown pool "missing"`,
		`leasing an instance of pool broken: no instance within 1s; the pool's last launch error: `,
	} {
		testutil.Eventually(t, "the failed substantiation in the master's log", 60*time.Second, func() bool {
			return strings.Contains(m.log(), want)
		})
	}

	// A master that stops releases its lease.
	m.stop(t)
	waitReleased(t, ts, third.lease, "by the master's stop")
	testutil.Eventually(t, "instance "+third.instance+" to be idle after the master stopped", 30*time.Second, func() bool {
		return ts.countState(t, "buildbot", pool.Idle) == 1
	})
	// A lease that waited in vain was canceled, not left to take an
	// instance later.
	pools, err := ts.client.Pools(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pools {
		if p.LeasesPending != 0 || p.Name == "broken" && p.LaunchError == "" {
			t.Errorf("pool %s after the master stopped: %d pending leases, launch error %q", p.Name, p.LeasesPending, p.LaunchError)
		}
	}

	// No password in a log, a console, a file of the instance (buildbot.tac
	// reads it from the environment) or a command line.
	for _, pw := range []string{first.password, second.password, third.password} {
		if strings.Contains(ts.logs.String(), pw) || strings.Contains(m.log(), pw) {
			t.Error("a worker password is in Hangar's or the master's log")
		}
		// The func never fails the walk: what cannot be read is skipped.
		_ = filepath.Walk(filepath.Join(ts.dataDir, "local", "instances"), func(path string, info os.FileInfo, err error) error {
			if err == nil && !info.IsDir() {
				if b, _ := os.ReadFile(path); bytes.Contains(b, []byte(pw)) {
					t.Errorf("a worker password is in %s", path)
				}
			}
			return nil
		})
	}
	for _, args := range first.cmdlines {
		if strings.Contains(args, first.password) {
			t.Errorf("the worker password is in a command line: %q", args)
		}
	}
	if strings.Contains(m.log(), token) {
		t.Error("the Hangar token is in the master's log")
	}
}

// waitReleased waits for lease id to be released by its holder; any other
// end (expired: no renew; lost: the instance died) fails at once.
func waitReleased(t *testing.T, ts *testServer, id, when string) {
	t.Helper()
	testutil.Eventually(t, "lease "+id+" to be released "+when, 60*time.Second, func() bool {
		l, err := ts.client.GetLease(context.Background(), id, 0)
		if err != nil {
			t.Fatalf("reading lease %s: %v", id, err)
		}
		if l.State != pool.LeaseActive && l.State != pool.LeaseReleased {
			t.Fatalf("lease %s is %s, want released %s", id, l.State, when)
		}
		return l.State == pool.LeaseReleased
	})
}

// noBytecode is the environment for Pythons that import
// ci/buildbot/hangar_buildbot.py: a test writes nothing into the tree.
func noBytecode() []string {
	return append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
}

type buildbotMaster struct {
	dir            string
	addr           string // of the worker (pb) port, where sendchange goes too
	changePassword string
	cmd            *exec.Cmd
	done           chan error
}

// masterExample is the README's master.cfg, which the test runs.
var masterExample = filepath.Join("..", "..", "ci", "buildbot", "master.cfg.example")

// newBuildbotMasterDir makes a master directory as the example's header
// says: master.cfg, hangar_buildbot.py next to it, and the token in
// secrets/hangar-token (0600 in a 0700 directory, as SecretInAFile wants).
func newBuildbotMasterDir(t *testing.T, dir, cfg, token string) {
	t.Helper()
	if out, err := exec.Command(buildbotBin, "create-master", "-q", "--db", "sqlite:///state.sqlite", dir).CombinedOutput(); err != nil {
		t.Fatalf("buildbot create-master: %v\n%s", err, out)
	}
	module, err := os.ReadFile(filepath.Join("..", "..", "ci", "buildbot", "hangar_buildbot.py"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "hangar_buildbot.py"), string(module))
	writeFile(t, filepath.Join(dir, "master.cfg"), cfg)
	if token != "" {
		if err := os.Mkdir(filepath.Join(dir, "secrets"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "secrets", "hangar-token"), []byte(token+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// exampleEnv is the environment master.cfg.example takes its settings
// from: the one way the test's master differs from the example's.
func exampleEnv(hangarURL, pbPort, changePassword string) []string {
	return append(noBytecode(),
		"HANGAR_URL="+hangarURL,
		"BUILDBOT_WORKER_PORT=tcp:"+pbPort+":interface=127.0.0.1",
		"BUILDBOT_MASTER_FQDN=127.0.0.1",
		// The lease goes back 3s after a build, not 5 minutes.
		"BUILDBOT_BUILD_WAIT_TIMEOUT=3",
		"BUILDBOT_CHANGE_PASSWORD="+changePassword)
}

// startBuildbotMaster creates a master in dir running ci/buildbot's
// master.cfg.example, whose HangarLatentWorker leases from the Hangar at
// hangarURL's pool "buildbot", starts it in the foreground and stops it
// when the test ends. The test appends to the example (never changes it)
// workers and builders for the failure cases.
func startBuildbotMaster(t *testing.T, dir, hangarURL, token string) *buildbotMaster {
	t.Helper()
	example, err := os.ReadFile(masterExample)
	if err != nil {
		t.Fatal(err)
	}
	py := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	cfg := string(example) + fmt.Sprintf(`
# Appended by cmd/hangar/buildbot_test.go: the logs in the database as
# text, and workers and builders for the failure cases.
import shlex
c['logCompressionMethod'] = 'raw'
failing = dict(hangar_url=setting('HANGAR_URL'), token=util.Secret('hangar-token'),
               masterFQDN=setting('BUILDBOT_MASTER_FQDN'))
c['workers'] += [
    HangarLatentWorker('hangar-missing', pool='missing', wait='60s', **failing),
    HangarLatentWorker('hangar-broken', pool='broken', wait='1s', **failing),
]
# The first build of this one kills its worker (the step's parent).
breaker = 'if mkdir ' + shlex.quote(%s) + ' 2>/dev/null; then kill -9 $PPID; sleep 60; fi' + where
breaker_factory = util.BuildFactory([steps.ShellCommand(name='where', command=['bash', '-c', breaker], haltOnFailure=True)])
c['builders'] += [
    util.BuilderConfig(name='breaker', workernames=['linux-1'], factory=breaker_factory),
    util.BuilderConfig(name='no-pool', workernames=['hangar-missing'], factory=c['builders'][0].factory),
    util.BuilderConfig(name='broken-pool', workernames=['hangar-broken'], factory=c['builders'][0].factory),
]
c['schedulers'] += [
    schedulers.AnyBranchScheduler(name=branch, treeStableTimer=None, builderNames=[builder],
                                  change_filter=util.ChangeFilter(branch=branch))
    for branch, builder in [('break', 'breaker'), ('nopool', 'no-pool'), ('broken', 'broken-pool')]
]
`, py(filepath.Join(dir, "broken-once")))
	newBuildbotMasterDir(t, dir, cfg, token)

	// sendchange must know the port before the master starts.
	m := &buildbotMaster{dir: dir, addr: freePort(t), changePassword: "changepw-e2e", done: make(chan error, 1)}
	_, port, _ := net.SplitHostPort(m.addr)

	logFile, err := os.Create(filepath.Join(dir, "stdout.log"))
	if err != nil {
		t.Fatal(err)
	}
	m.cmd = exec.Command(buildbotBin, "start", "--nodaemon", dir)
	m.cmd.Env = exampleEnv(hangarURL, port, m.changePassword)
	m.cmd.Stdout, m.cmd.Stderr = logFile, logFile
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("starting the buildbot master: %v", err)
	}
	if err := logFile.Close(); err != nil { // the child has its own copy
		t.Fatal(err)
	}
	go func() { m.done <- m.cmd.Wait() }()
	t.Cleanup(func() {
		m.stop(t)
		if t.Failed() {
			t.Logf("master twistd.log:\n%s", m.log())
			workerLogs, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), "hangar", "local", "instances", "*", "disk", "buildbot-worker", "*", "twistd.log"))
			for _, p := range workerLogs {
				b, _ := os.ReadFile(p)
				t.Logf("%s:\n%s", p, b)
			}
		}
	})
	testutil.Eventually(t, "the buildbot master to listen", 60*time.Second, func() bool {
		select {
		case err := <-m.done:
			m.done <- err
			b, _ := os.ReadFile(filepath.Join(dir, "stdout.log"))
			t.Fatalf("the buildbot master exited: %v\n%s\n%s", err, b, m.log())
		default:
		}
		c, err := net.Dial("tcp", m.addr)
		if err == nil {
			_ = c.Close()
		}
		return err == nil
	})
	return m
}

// stop ends the master as `buildbot stop` does, with SIGTERM, and its
// whole process group with SIGKILL if it is not gone in 30s.
func (m *buildbotMaster) stop(t *testing.T) {
	t.Helper()
	if m.cmd == nil {
		return
	}
	pgid := m.cmd.Process.Pid
	m.cmd = nil
	_ = syscall.Kill(-pgid, syscall.SIGTERM) // ESRCH: gone already, which m.done says
	select {
	case err := <-m.done:
		if err != nil {
			t.Logf("the buildbot master exited: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("the buildbot master did not stop within 30s of SIGTERM")
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		t.Logf("the buildbot master exited: %v", <-m.done)
	}
	// Anything it left in its group goes too (ESRCH: nothing left).
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}

func (m *buildbotMaster) log() string {
	b, _ := os.ReadFile(filepath.Join(m.dir, "twistd.log"))
	return string(b)
}

func (m *buildbotMaster) sendchange(t *testing.T, branch, revision string) {
	t.Helper()
	out, err := exec.Command(buildbotBin, "sendchange", "--master", m.addr,
		"--auth", "change:"+m.changePassword, "--who", "hangar-test", "--branch", branch, "--revision", revision,
		"--comments", "hangar e2e", "file.txt").CombinedOutput()
	if err != nil {
		t.Fatalf("buildbot sendchange: %v\n%s", err, out)
	}
}

type buildbotBuild struct {
	instance, lease, password string
	started, finished         time.Time
	results                   *int
	log                       string
	cmdlines                  []string // of the instance's processes while leased
}

// buildsQuery prints the master's builds with their step logs as JSON.
const buildsQuery = `
import json, sqlite3, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True, timeout=10)
rows = db.execute("""
    SELECT b.id, bl.name, b.number, b.results, b.complete_at
    FROM builds b JOIN builders bl ON bl.id = b.builderid ORDER BY b.id""").fetchall()
out = []
for bid, builder, number, results, complete_at in rows:
    chunks = db.execute("""
        SELECT lc.content FROM steps s JOIN logs l ON l.stepid = s.id
        JOIN logchunks lc ON lc.logid = l.id WHERE s.buildid = ? ORDER BY l.id, lc.first_line""", (bid,)).fetchall()
    log = "".join(c[0].decode() if isinstance(c[0], bytes) else c[0] for c in chunks)
    out.append(dict(builder=builder, number=number, results=results, complete=complete_at is not None, log=log))
print(json.dumps(out))
`

type buildRow struct {
	Builder  string `json:"builder"`
	Number   int    `json:"number"`
	Results  *int   `json:"results"`
	Complete bool   `json:"complete"`
	Log      string `json:"log"`
}

func (m *buildbotMaster) builds(t *testing.T) []buildRow {
	t.Helper()
	out, err := exec.Command(systemPython, "-c", buildsQuery, filepath.Join(m.dir, "state.sqlite")).Output()
	if err != nil {
		t.Fatalf("reading the master's builds: %v", err)
	}
	var rows []buildRow
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatalf("reading the master's builds: %v\n%s", err, out)
	}
	return rows
}

// waitBuild waits for build number n of builder to finish and returns
// where and when it ran. It notes the command lines of the instance's
// processes while the build's step runs.
func (m *buildbotMaster) waitBuild(t *testing.T, ts *testServer, builder string, n int) buildbotBuild {
	t.Helper()
	var b buildbotBuild
	var row buildRow
	// Not waitFor: each look at the builds starts a python, so look less
	// often than it polls.
	for deadline := time.Now().Add(120 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for build %d of %s to finish", n, builder)
		}
		for _, r := range m.builds(t) {
			if r.Builder == builder && r.Number == n {
				row = r
			}
		}
		if b.cmdlines == nil && strings.Contains(row.Log, " instance=") {
			b.cmdlines = []string{}
			for _, pid := range instanceProcs(instanceOfLog(row.Log)) {
				if c, err := os.ReadFile("/proc/" + pid + "/cmdline"); err == nil {
					b.cmdlines = append(b.cmdlines, string(bytes.ReplaceAll(c, []byte{0}, []byte{' '})))
				}
			}
		}
		if row.Complete {
			break
		}
	}
	b.finished = time.Now()
	b.results, b.log = row.Results, row.Log
	fields := map[string]string{}
	for _, line := range strings.Split(row.Log, "\n") {
		if _, rest, ok := strings.Cut(line, "hangar-example "); ok {
			for _, f := range strings.Fields(rest) {
				k, v, _ := strings.Cut(f, "=")
				fields[k] = v
			}
		}
	}
	if row.Results == nil || *row.Results != 0 {
		return b
	}
	secs, err := strconv.ParseFloat(fields["started"], 64)
	if err != nil || !strings.HasPrefix(fields["instance"], "i-") || fields["lease"] == "" {
		t.Fatalf("build %d of %s printed no start time, instance id or lease; its log:\n%s", n, builder, row.Log)
	}
	b.started = time.Unix(0, int64(secs*1e9))
	b.instance, b.lease = fields["instance"], fields["lease"]
	l, err := ts.client.GetLease(context.Background(), b.lease, 0)
	if err != nil {
		t.Fatalf("build %d of %s ran under lease %s: %v", n, builder, b.lease, err)
	}
	b.password = l.Worker.Password
	if l.Instance != nil && l.Instance.ID != b.instance {
		t.Errorf("build %d of %s ran on %s under lease %s of instance %s", n, builder, b.instance, b.lease, l.Instance.ID)
	}
	return b
}

// mustSucceed is waitBuild for a build that must succeed.
func (m *buildbotMaster) mustSucceed(t *testing.T, ts *testServer, builder string, n int) buildbotBuild {
	t.Helper()
	b := m.waitBuild(t, ts, builder, n)
	if b.results == nil || *b.results != 0 {
		t.Fatalf("build %d of %s finished with results %v, want 0 (success); its log:\n%s", n, builder, b.results, b.log)
	}
	return b
}

func instanceOfLog(log string) string {
	_, rest, _ := strings.Cut(log, " instance=")
	id, _, _ := strings.Cut(rest, " ")
	return id
}

// `buildbot checkconfig` passes master.cfg.example as the README says to
// install it, and refuses a HangarLatentWorker with bad arguments with
// Hangar's messages, each naming the worker.
func TestBuildbotCheckconfig(t *testing.T) {
	requireBuildbot(t)
	example, err := os.ReadFile(masterExample)
	if err != nil {
		t.Fatal(err)
	}
	env := exampleEnv("http://127.0.0.1:7878", "9989", "changepw-check")
	checkconfig := func(dir string) (string, error) {
		cmd := exec.Command(buildbotBin, "checkconfig", dir)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	good := filepath.Join(t.TempDir(), "master")
	newBuildbotMasterDir(t, good, string(example), "tok_checkconfig-0123456789")
	if out, err := checkconfig(good); err != nil || !strings.Contains(out, "Config file is good!") {
		t.Errorf("buildbot checkconfig of master.cfg.example: %v\n%s", err, out)
	}

	bad := filepath.Join(t.TempDir(), "master")
	newBuildbotMasterDir(t, bad, string(example)+`
c['workers'].append(HangarLatentWorker('linux-2', hangar_url='hangar.internal:7878', token=util.Secret('hangar-token'), wait='soon'))
`, "tok_checkconfig-0123456789")
	out, err := checkconfig(bad)
	if err == nil {
		t.Fatalf("buildbot checkconfig passed a HangarLatentWorker without a pool:\n%s", out)
	}
	for _, want := range []string{
		"HangarLatentWorker 'linux-2': hangar_url must be Hangar's http:// or https:// URL, got 'hangar.internal:7878'",
		"HangarLatentWorker 'linux-2': pool must name a Hangar pool",
		"HangarLatentWorker 'linux-2': wait: 'soon' is not a duration such as 90s, 10m or 1h30m",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("buildbot checkconfig's output has no %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "Traceback") {
		t.Errorf("buildbot checkconfig shows a traceback rather than the config errors:\n%s", out)
	}
}

// A token given as util.Secret that no secrets provider has stops the
// master at its start with a message that names the worker and the cure,
// not an AttributeError. (checkconfig cannot tell: secrets are read only
// when the master starts.)
func TestBuildbotMissingSecret(t *testing.T) {
	requireBuildbot(t)
	example, err := os.ReadFile(masterExample)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, appended, token, want string
	}{{
		name:     "no secretsProviders",
		appended: "\ndel c['secretsProviders']\n",
		token:    "tok_secret-0123456789",
		want: "HangarLatentWorker 'linux-1': token: util.Secret('hangar-token') needs c['secretsProviders'] in master.cfg, " +
			"and it has none; e.g. c['secretsProviders'] = [secrets.SecretInAFile(dirname=...)] with the token in the file hangar-token of that directory",
	}, {
		name:  "no token file",
		token: "", // secrets/ is there, empty
		want:  "HangarLatentWorker 'linux-1': token: no secrets provider of the master (SecretInAFile) has the secret 'hangar-token'",
	}} {
		t.Run(c.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "master")
			newBuildbotMasterDir(t, dir, string(example)+c.appended, c.token)
			if c.token == "" {
				if err := os.Mkdir(filepath.Join(dir, "secrets"), 0o700); err != nil {
					t.Fatal(err)
				}
			}
			_, port, _ := net.SplitHostPort(freePort(t))
			// The master stops by itself when its start fails; the
			// timeout only bounds a master that would not.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, buildbotBin, "start", "--nodaemon", dir)
			cmd.Env = exampleEnv("http://127.0.0.1:1", port, "changepw-secret")
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
			out, err := cmd.CombinedOutput()
			b, _ := os.ReadFile(filepath.Join(dir, "twistd.log"))
			log := string(b)
			if ctx.Err() != nil {
				t.Fatalf("the master with a missing secret did not stop: %v\n%s\n%s", err, out, log)
			}
			if !strings.Contains(log, c.want) || !strings.Contains(log, "BuildMaster startup failed") {
				t.Errorf("the master's log has no %q and no failed start:\n%s", c.want, log)
			}
			if strings.Contains(log, "AttributeError") {
				t.Errorf("the master's log has an AttributeError:\n%s", log)
			}
		})
	}
}

// A pool whose bootstrap is a file with include lines boots instances that
// speak the protocol: the repository's own buildbot-worker.sh given by path
// (its include of generic.sh is the file next to it) reports ready and
// brings its worker command, as builtin:buildbot-worker.sh does; and a
// script of one's own that includes a file of its own and
// builtin:generic.sh runs its worker-command line's worker when leased.
func TestFileBootstrapIncludes(t *testing.T) {
	requireBuildbot(t) // buildbot-worker.sh refuses a local cloud without buildbot-worker
	dir := t.TempDir()
	repoScript, err := filepath.Abs(filepath.Join("..", "..", "scripts", "bootstrap", "buildbot-worker.sh"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "ci", "lib"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "ci", "boot.sh"), "#!/bin/bash\n"+
		"# hangar:worker-command "+workerCommand+"\n"+
		"# hangar:include lib/hello.sh\n"+
		"# hangar:include builtin:generic.sh\n")
	writeFile(t, filepath.Join(dir, "ci", "lib", "hello.sh"), "echo \"hangar-test: lib/hello.sh included\"\n")
	ts := startTestWith(t, fmt.Sprintf(`
[server]
listen = "127.0.0.1:0"
data_dir = %q
reconcile_interval = "1s"

[providers.local]
type = "local"

[pools.bbfile]
provider = "local"
min_idle = 1
max_instances = 1
boot_timeout = "2m"
bootstrap = %q

[pools.own]
provider = "local"
min_idle = 1
max_instances = 1
boot_timeout = "2m"
bootstrap = %q
`, filepath.Join(dir, "hangar"), repoScript, filepath.Join(dir, "ci", "boot.sh")), serveOptions{})

	for _, p := range []string{"bbfile", "own"} {
		testutil.Eventually(t, "pool "+p+"'s instance to report ready", 90*time.Second, func() bool {
			return ts.countState(t, p, pool.Idle) == 1
		})
	}
	if got, want := ts.cfg.Pools["bbfile"].WorkerCommand, `exec bash "$HANGAR_BUILDBOT_START"`; got != want {
		t.Errorf("pool bbfile's worker_command = %q, want buildbot-worker.sh's %q", got, want)
	}
	v := ts.lease(t, api.LeaseRequest{Pool: "own", Worker: pool.Worker{Name: "w1", Master: "ci.example:9989"}})
	if env := ts.workerEnv(t, v.Instance.ID); env["HANGAR_WORKER_NAME"] != "w1" || env["HANGAR_LEASE_ID"] != v.ID {
		t.Errorf("the worker of boot.sh's worker-command line ran with %v", env)
	}
	console, err := os.ReadFile(filepath.Join(ts.dataDir, "local", "instances", v.Instance.ID, "console.log"))
	if err != nil || !strings.Contains(string(console), "hangar-test: lib/hello.sh included") {
		t.Errorf("console of %s has no line of the included lib/hello.sh (%v):\n%s", v.Instance.ID, err, console)
	}
}
