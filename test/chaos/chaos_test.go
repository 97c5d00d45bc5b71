package chaos

// TestKill9Chaos: the crash test. What it does, and what its figures mean.
//
// Setup. The real hangar binary is built once into t.TempDir() (or copied
// from HANGAR_CHAOS_BIN, to test another build) and run as `hangar serve`
// with a config written here: one local-cloud pool of at most maxInstances
// instances launched in batches of up to 4 (each enrolling at boot),
// min_idle 1, idle_ttd 2s, lease_ttl 3s, the API on
// 127.0.0.1:<free port> in open loopback mode (no tokens), the data dir in
// the temp dir.
//
// Load. numClients goroutines loop: POST /v1/leases with a client_token
// unique to the iteration and wait=3s; after a connection error (the server
// is being killed) the same client_token is sent again; a 202 pending lease
// is waited for with GET ?wait=3s. Holding an active lease they renew now
// and then (one lease in ten is abandoned without renewing, to expire),
// then release it, with discard=true a third of the time, retrying the
// DELETE until a 204.
//
// Faults. The server gets SIGKILL at ≥ minKills moments and is restarted
// each time on the same data dir and port. Every other run is under
//
//	strace -f -o /dev/null -e trace=write,fdatasync,fsync \
//	       -e inject=write,fdatasync,fsync:delay_exit=D
//
// (D of 2 to 12 ms; strace 6.1 silently injects nothing with -e
// trace=none, so the syscalls are traced, to /dev/null). The delayed log
// write inside a decision lets the store's writer commit the decision's
// first records alone, and the delayed fdatasync holds the server right
// after each commit is on disk. Most of those runs are killed within 2D of
// a "lease fulfilled" log line, i.e. between the two halves of an
// assignment if they are committed apart. The other kills are uniform in
// the run's uptime, or follow a random kind of log line by a few ms.
//
// Checks. An observer polls GET /v1/instances, the leases the clients hold
// and, in rotation, the leases already released or ended, and counts the
// local cloud's instances from its files and /proc. Every answer any
// goroutine gets about an acknowledged lease is judged the same way:
//
//   - acknowledged lease: a 201 (or 200) answer with state active. Its
//     acknowledged expiry is the latest expires_at of that answer and of its
//     renew answers.
//   - lost (violation): before its holder sent a release, a read of an
//     acknowledged lease answers 404 (the server forgot it), pending (it went
//     back), active on another instance than the one acknowledged, released
//     or canceled (ended without its holder asking), or expired while the
//     clock had not yet passed its acknowledged expiry. A lease the server
//     ends as expired after its acknowledged expiry, or as lost (the server
//     says its instance vanished), is not a violation: both are endings the
//     API documents; they are counted in the figures ("expired", "ended
//     lost").
//   - release undone (violation): after a 204 to its release, a read of the
//     lease answers active or pending.
//   - resurrected (violation): after any read answered an ended state, a
//     later read answers active or pending.
//   - double assignment (violation): two leases both answer active naming
//     the same instance id in two consecutive passes of reads. (States only
//     move forward, anything else being a violation of its own, so active in
//     both passes means both were active at one moment between them.)
//   - max_instances (violation): more than maxInstances instances listed by
//     GET /v1/instances at once (the store's view, one snapshot under the
//     manager's lock); on the local cloud, more than maxInstances instances
//     whose instance.json is not terminated (terminating counts: it is not
//     terminated, and only another terminate call finishes it), or more than
//     maxInstances instances with live processes, each seen in two
//     consecutive scans (so all were there at one moment).
//   - stranded instance (violation): once the chaos is over, an instance the
//     server lists as booting although its bootstrap's ready report was
//     answered 2xx (it never reports twice), or as booting, idle, leased or
//     releasing although its bootstrap was refused with a 401, or told to
//     terminate, and stopped.
//   - left after scale to zero (violation): once every lease is released,
//     the pool is scaled to min_idle 0 (max_instances 0 is refused by the
//     API, which wants ≥ 1), its idle instances are left to the reaper
//     (idle_ttd), then what remains is drained; any instance process still
//     running after that. Records left not terminated without processes are
//     a figure.
//
// The test ends every process it starts: the servers (and strace), and at
// the end every local-cloud instance with `hangar local terminate-all`.
// HANGAR_CHAOS_LOG=FILE copies the servers' log there at the end.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

const (
	poolName     = "chaos"
	maxInstances = 6
	numClients   = 16
	minKills     = 30
	targetKills  = 32
	leaseTTL     = 3 * time.Second
	// maxChaos bounds the kill phase; the whole test stays under 3 minutes.
	maxChaos = 100 * time.Second
)

func TestKill9Chaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test: kills a real server 30 times and more")
	}
	start := time.Now()
	h := newHarness(t)
	h.run()
	h.report(time.Since(start))
}

// ---------------------------------------------------------------------------
// Harness: the binary, the config, the server processes.

type harness struct {
	t        *testing.T
	seed     uint64
	dir      string
	bin      string
	dataDir  string
	localDir string
	cfgPath  string
	addr     string
	logPath  string
	client   *api.Client

	straceOK  bool
	straceWhy string

	logMu   sync.Mutex
	logFile *os.File
	events  chan string // kinds of log lines seen, for triggered kills

	srv         *serverProc // the running server; only the test goroutine touches it
	runs        int
	kills       int
	straceKills int
	straceRuns  int
	triggered   int

	tr       *tracker
	stopping atomic.Bool

	scaleZeroAnswer string   // what PATCH max_instances=0 got
	notReaped       []string // instances the reaper left, which were drained
	terminateAllOut string
	staleRecords    []string // local-cloud records not terminated, without processes, at the end
	serverLeft      []string // instances the server still listed at the end
}

func newHarness(t *testing.T) *harness {
	root := moduleRoot(t)
	dir := t.TempDir()
	h := &harness{
		t:        t,
		seed:     rand.Uint64(),
		dir:      dir,
		bin:      filepath.Join(dir, "hangar"),
		dataDir:  filepath.Join(dir, "data"),
		cfgPath:  filepath.Join(dir, "hangar.toml"),
		addr:     freePort(t),
		logPath:  filepath.Join(dir, "serve.log"),
		events:   make(chan string, 256),
		tr:       newTracker(),
		straceOK: false,
	}
	h.localDir = filepath.Join(h.dataDir, "local")
	if s := os.Getenv("HANGAR_CHAOS_SEED"); s != "" {
		if n, err := strconv.ParseUint(s, 10, 64); err == nil {
			h.seed = n
		}
	}
	t.Logf("seed %d (HANGAR_CHAOS_SEED reruns the same random choices; timing still differs)", h.seed)

	if bin := os.Getenv("HANGAR_CHAOS_BIN"); bin != "" {
		// Another build of hangar (an older commit, say), copied in so
		// that the test ends only what it started.
		b, err := os.ReadFile(bin)
		if err != nil {
			t.Fatalf("HANGAR_CHAOS_BIN: %v", err)
		}
		if err := os.WriteFile(h.bin, b, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Logf("testing the hangar binary %s (HANGAR_CHAOS_BIN), not this tree", bin)
	} else {
		built := time.Now()
		args := []string{"build", "-o", h.bin}
		if raceEnabled {
			args = append(args, "-race")
		}
		build := exec.Command("go", append(args, "./cmd/hangar")...)
		build.Dir = root
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("building hangar: %v\n%s", err, out)
		}
		t.Logf("built hangar in %s", time.Since(built).Round(time.Millisecond))
	}
	cfg := fmt.Sprintf(`
[server]
listen = %q
data_dir = %q
reconcile_interval = "2s"
orphan_grace = "30s"

[providers.local]
type = "local"

[pools.%s]
provider = "local"
min_idle = 1
max_instances = %d
launch_batch = 4
idle_ttd = "2s"
boot_timeout = "60s"
lease_ttl = %q
max_lease_ttl = "1m"
worker_command = 'exec sleep 600'
`, h.addr, h.dataDir, poolName, maxInstances, leaseTTL.String())
	if err := os.WriteFile(h.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(h.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	h.logFile = f
	h.client = &api.Client{BaseURL: "http://" + h.addr, HTTP: &http.Client{
		Timeout:   20 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: 4 * numClients},
	}}
	h.straceOK, h.straceWhy = straceUsable()
	if !h.straceOK && testutil.RequireTools() {
		// CI installs strace: without it the crash windows stay narrow.
		testutil.ToolMissing(t, "%s (Debian: strace)", h.straceWhy)
	}
	// Whatever happens, end what this test started: the server, strace,
	// and the local cloud's instances.
	t.Cleanup(h.cleanup)
	return h
}

// moduleRoot finds the directory of the hangar module's go.mod above the
// test's working directory.
func moduleRoot(t *testing.T) string {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/hangar-ci/hangar\n")) {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod of github.com/hangar-ci/hangar above the working directory")
		}
		dir = parent
	}
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	return ln.Addr().String()
}

// straceUsable reports whether strace can trace and inject delays here (it
// needs ptrace, which some containers forbid).
func straceUsable() (bool, string) {
	if _, err := exec.LookPath("strace"); err != nil {
		return false, "strace is not on PATH"
	}
	out, err := exec.Command("strace", "-f", "-qq", "-o", "/dev/null", "-e", "signal=none",
		"-e", "trace=fdatasync", "-e", "inject=fdatasync:delay_exit=1000", "true").CombinedOutput()
	if err != nil {
		return false, fmt.Sprintf("strace does not work here: %v: %s", err, bytes.TrimSpace(out))
	}
	return true, ""
}

type serverProc struct {
	cmd     *exec.Cmd // hangar, or strace running it
	pid     int       // hangar's own pid
	strace  bool
	delayUS int
	exited  chan struct{} // cmd.Wait returned
	logDone chan struct{} // the log pipe reached EOF
}

// logKinds are the server log lines a triggered kill waits for.
var logKinds = []string{"lease fulfilled", "lease ended", "instance state"}

// startServer starts `hangar serve` (under strace with a write delay of
// delayUS microseconds when strace is set) and waits for it to answer.
func (h *harness) startServer(strace bool, delayUS int) *serverProc {
	h.t.Helper()
	h.runs++
	args := []string{"serve", "--config", h.cfgPath}
	var cmd *exec.Cmd
	if strace {
		sargs := []string{"-f", "-qq", "-o", "/dev/null", "-e", "signal=none",
			"-e", "trace=write,fdatasync,fsync",
			"-e", fmt.Sprintf("inject=write,fdatasync,fsync:delay_exit=%d", delayUS),
			"--", h.bin}
		cmd = exec.Command("strace", append(sargs, args...)...)
	} else {
		cmd = exec.Command(h.bin, args...)
	}
	r, w, err := os.Pipe()
	if err != nil {
		h.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = w, w
	h.writeLog(fmt.Sprintf("=== chaos: run %d, strace=%t delay=%dus, at %s\n", h.runs, strace, delayUS, time.Now().Format(time.RFC3339Nano)))
	if err := cmd.Start(); err != nil {
		_ = w.Close()
		_ = r.Close()
		h.t.Fatalf("starting hangar serve: %v", err)
	}
	_ = w.Close() // the child has its copy; r sees EOF when it exits
	p := &serverProc{cmd: cmd, pid: cmd.Process.Pid, strace: strace, delayUS: delayUS,
		exited: make(chan struct{}), logDone: make(chan struct{})}
	h.srv = p
	go func() {
		_ = cmd.Wait() // killed or stopped: how it ended is in its log and the checks
		close(p.exited)
	}()
	go h.tailLog(r, p.logDone)
	if strace {
		p.pid = h.tracedChild(p)
	}
	deadline := time.Now().Add(30 * time.Second)
	hc := &http.Client{Timeout: time.Second}
	for {
		resp, err := hc.Get("http://" + h.addr + "/healthz")
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-p.exited:
			h.t.Fatalf("hangar serve (run %d) exited before answering; log tail:\n%s", h.runs, h.logTail(40))
		default:
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("hangar serve (run %d) did not answer within 30s; log tail:\n%s", h.runs, h.logTail(40))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// tracedChild returns the pid of the hangar process strace started, once
// it runs hangar.
func (h *harness) tracedChild(p *serverProc) int {
	spid := strconv.Itoa(p.cmd.Process.Pid)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile("/proc/" + spid + "/task/" + spid + "/children")
		for _, f := range strings.Fields(string(b)) {
			if exe, _ := os.Readlink("/proc/" + f + "/exe"); exe == h.bin {
				pid, _ := strconv.Atoi(f)
				return pid
			}
		}
		select {
		case <-p.exited:
			h.t.Fatalf("strace exited at start; log tail:\n%s", h.logTail(20))
		default:
		}
		time.Sleep(2 * time.Millisecond)
	}
	h.t.Fatal("strace did not start hangar within 10s")
	return 0
}

func (h *harness) writeLog(s string) {
	h.logMu.Lock()
	defer h.logMu.Unlock()
	_, _ = h.logFile.WriteString(s) // for diagnosis only; Close reports a file that failed
}

// tailLog copies the server's output to the log file and signals the kinds
// of lines triggered kills wait for.
func (h *harness) tailLog(r *os.File, done chan struct{}) {
	defer close(done)
	defer func() { _ = r.Close() }()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		for _, k := range logKinds {
			if strings.Contains(line, `msg="`+k) {
				select {
				case h.events <- k:
				default:
				}
			}
		}
		h.writeLog(line + "\n")
	}
}

// logTail returns the last n lines of the servers' log.
func (h *harness) logTail(n int) string {
	h.logMu.Lock()
	b, _ := os.ReadFile(h.logPath)
	h.logMu.Unlock()
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// logGrep returns the log lines that contain any of words, at most n.
func (h *harness) logGrep(n int, words ...string) string {
	h.logMu.Lock()
	b, _ := os.ReadFile(h.logPath)
	h.logMu.Unlock()
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		keep := strings.HasPrefix(line, "=== chaos")
		for _, w := range words {
			if w != "" && strings.Contains(line, w) {
				keep = true
			}
		}
		if keep {
			out = append(out, line)
		}
	}
	// Run markers alone say nothing; keep those next to a match.
	var trimmed []string
	for i, line := range out {
		if strings.HasPrefix(line, "=== chaos") && (i+1 >= len(out) || strings.HasPrefix(out[i+1], "=== chaos")) {
			continue
		}
		trimmed = append(trimmed, line)
	}
	if len(trimmed) > n {
		trimmed = trimmed[len(trimmed)-n:]
	}
	return strings.Join(trimmed, "\n")
}

// kill9 kills hangar with SIGKILL and waits until it is gone. Under strace,
// strace is killed next: a tracee held in a delayed syscall stays in its
// tracing stop with the SIGKILL pending (and strace 6.1 may abort on it),
// so it dies only once detached. It runs no more of its own code either
// way: the moment of the first SIGKILL is the crash. strace's other
// tracees, the instances hangar forked, are detached and run on.
func (h *harness) kill9(p *serverProc) {
	if err := syscall.Kill(p.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		h.t.Errorf("kill -9 %d: %v", p.pid, err)
	}
	if p.strace {
		_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL) // ESRCH: strace ended with its tracee
	}
	<-p.exited
	// strace's tracee is not our child: wait until it no longer runs (a
	// zombie holds no file lock), sending SIGKILL again now and then.
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; procAlive(p.pid, false); i++ {
		if time.Now().After(deadline) {
			st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid))
			h.t.Fatalf("hangar (pid %d, strace %t) survives SIGKILL:\n%s", p.pid, p.strace, st)
		}
		if i%50 == 49 {
			_ = syscall.Kill(p.pid, syscall.SIGKILL) // ESRCH: gone meanwhile
		}
		time.Sleep(2 * time.Millisecond)
	}
	<-p.logDone
	if h.srv == p {
		h.srv = nil
	}
}

// stopServer ends the server gracefully (SIGTERM), killing it after 20s.
func (h *harness) stopServer(p *serverProc) {
	if p.strace {
		h.kill9(p)
		return
	}
	if err := syscall.Kill(p.pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		h.t.Errorf("kill -TERM %d: %v", p.pid, err)
	}
	select {
	case <-p.exited:
	case <-time.After(20 * time.Second):
		h.t.Errorf("hangar serve did not stop within 20s of SIGTERM; killing it")
		_ = syscall.Kill(p.pid, syscall.SIGKILL) // ESRCH: gone meanwhile
		<-p.exited
	}
	<-p.logDone
	if h.srv == p {
		h.srv = nil
	}
}

// procAlive reports whether pid exists (zombies count only if zombies is set).
func procAlive(pid int, zombies bool) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	st := b[i+2]
	if st == 'Z' || st == 'X' {
		return zombies && st == 'Z'
	}
	return true
}

func (h *harness) cleanup() {
	if h.srv != nil {
		h.kill9(h.srv)
	}
	if _, err := os.Stat(h.localDir); err == nil {
		out, err := exec.Command(h.bin, "local", "terminate-all", "--config", h.cfgPath).CombinedOutput()
		if err != nil {
			h.t.Errorf("hangar local terminate-all: %v\n%s", err, out)
		}
	}
	// A last resort: SIGKILL whatever instance process of this data dir is
	// left (each one descends from a server this test started), and say so.
	for i := 0; i < 50; i++ {
		procs := h.instanceProcs()
		if len(procs) == 0 {
			break
		}
		if i == 0 {
			h.t.Errorf("instance processes left after terminate-all: %v", procs)
		}
		for _, pids := range procs {
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL) // ESRCH: gone meanwhile
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	h.logMu.Lock()
	if err := h.logFile.Close(); err != nil {
		h.t.Errorf("closing the chaos log: %v", err)
	}
	h.logMu.Unlock()
}

// ---------------------------------------------------------------------------
// The local cloud, seen from outside: its files and /proc. (A second
// local.Provider is not opened while servers come and go: it would take the
// metadata service's port, which a restarted server expects to get back.)

// cloudRecords returns the instances of the local cloud whose record is not
// terminated, with their state.
func (h *harness) cloudRecords() map[string]string {
	out := map[string]string{}
	ents, _ := os.ReadDir(filepath.Join(h.localDir, "instances"))
	for _, e := range ents {
		id := e.Name()
		if !strings.HasPrefix(id, "i-") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(h.localDir, "instances", id, "instance.json"))
		if err != nil {
			continue // being buried: the tombstone is written first
		}
		var r struct {
			State string `json:"state"`
		}
		if json.Unmarshal(b, &r) != nil || r.State == "terminated" {
			continue
		}
		if _, err := os.Stat(filepath.Join(h.localDir, "terminated", id+".json")); err == nil {
			continue
		}
		out[id] = r.State
	}
	return out
}

// instanceProcs returns the live processes of this test's local-cloud
// instances, by instance id: those whose environment has the local cloud's
// instance marker and a HANGAR_ROOT under this data dir.
func (h *harness) instanceProcs() map[string][]int {
	out := map[string][]int{}
	prefix := []byte("HANGAR_ROOT=" + filepath.Join(h.localDir, "instances") + "/")
	marker := []byte("HANGAR_LOCAL_INSTANCE_ID=")
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !procAlive(pid, false) {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil || !bytes.Contains(env, prefix) {
			continue
		}
		for kv := range bytes.SplitSeq(env, []byte{0}) {
			if id, ok := bytes.CutPrefix(kv, marker); ok {
				out[string(id)] = append(out[string(id)], pid)
			}
		}
	}
	return out
}

// cloudCount counts, in two consecutive scans, the instances that are live
// in both: non-terminated records and instances with processes. Instances
// do not come back from terminated, so those were all live at one moment
// between the scans.
func (h *harness) cloudCount() (recs map[string]string, procs map[string][]int) {
	r1, p1 := h.cloudRecords(), h.instanceProcs()
	r2, p2 := h.cloudRecords(), h.instanceProcs()
	recs, procs = map[string]string{}, map[string][]int{}
	for id, st := range r2 {
		if _, ok := r1[id]; ok {
			recs[id] = st
		}
	}
	for id, pids := range p2 {
		if _, ok := p1[id]; ok {
			procs[id] = pids
		}
	}
	return recs, procs
}

// ---------------------------------------------------------------------------
// Tracker: what clients were told, and the judgement of every later answer.

type leaseRec struct {
	id       string
	client   int
	token    string
	instance string    // acknowledged instance id
	ackAt    time.Time // when the acknowledgement arrived
	expires  time.Time // latest acknowledged expires_at
	relSent  time.Time // first release request sent
	relAck   time.Time // 204 received
	discard  bool
	endedAt  time.Time // first read that answered an ended state
	endState pool.LeaseState
	counted  bool // its server-given ending is counted
}

type tracker struct {
	mu      sync.Mutex
	leases  map[string]*leaseRec
	all     []*leaseRec
	viols   map[string][]string
	doubles map[string]bool // violations already reported, by key
	rot     int

	acked, releases, discards, renews, expired, endedLost int
	apiErrors, connErrors, reads, forgottenPending        int
	maxStore, maxCloudRecs, maxCloudProcs, cloudScans     int
	storeScans, doubleChecks, endedBeforeAck, undoneReads int
}

// Violation kinds, in the order the report prints them.
var violationKinds = []string{"lost", "release_undone", "resurrected", "double_assignment",
	"max_instances_store", "max_instances_cloud_records", "max_instances_cloud_procs",
	"instance_stranded", "left_after_scale_to_zero", "bad_answer"}

func newTracker() *tracker {
	return &tracker{leases: map[string]*leaseRec{}, viols: map[string][]string{}, doubles: map[string]bool{}}
}

func (tr *tracker) violate(kind, format string, a ...any) {
	tr.viols[kind] = append(tr.viols[kind], fmt.Sprintf(format, a...))
}

func ts(t time.Time) string { return t.Format("15:04:05.000000") }

// ack records a lease acknowledged active to client.
func (tr *tracker) ack(client int, token string, v pool.LeaseView, recv time.Time) *leaseRec {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if old, ok := tr.leases[v.ID]; ok {
		tr.violate("bad_answer", "lease %s acknowledged to client %d (token %s) was already acknowledged to client %d (token %s)", v.ID, client, token, old.client, old.token)
		return nil
	}
	rec := &leaseRec{id: v.ID, client: client, token: token, ackAt: recv, expires: v.ExpiresAt}
	if v.Instance == nil || v.Instance.ID == "" {
		tr.violate("bad_answer", "lease %s acknowledged active at %s names no instance", v.ID, ts(recv))
	} else {
		rec.instance = v.Instance.ID
	}
	tr.leases[v.ID] = rec
	tr.all = append(tr.all, rec)
	tr.acked++
	return rec
}

// othersOn returns the held leases (acknowledged, release not asked, not
// seen ended) on instance, other than rec.
func (tr *tracker) othersOn(rec *leaseRec) []*leaseRec {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var out []*leaseRec
	for _, o := range tr.all {
		if o != rec && o.instance == rec.instance && o.relSent.IsZero() && o.endedAt.IsZero() {
			out = append(out, o)
		}
	}
	return out
}

// watchList returns the leases clients hold, and n of the others in
// rotation.
func (tr *tracker) watchList(n int) []*leaseRec {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var held, rest []*leaseRec
	for _, r := range tr.all {
		if r.relAck.IsZero() && r.endedAt.IsZero() {
			held = append(held, r)
		} else {
			rest = append(rest, r)
		}
	}
	for i := 0; i < n && i < len(rest); i++ {
		held = append(held, rest[(tr.rot+i)%len(rest)])
	}
	tr.rot += n
	return held
}

func (tr *tracker) snapshot() []*leaseRec {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]*leaseRec(nil), tr.all...)
}

func (tr *tracker) renewed(rec *leaseRec, v pool.LeaseView) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.renews++
	if v.State == pool.LeaseActive && v.ExpiresAt.After(rec.expires) {
		rec.expires = v.ExpiresAt
	}
}

func (tr *tracker) releaseSent(rec *leaseRec, discard bool, at time.Time) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if rec.relSent.IsZero() {
		rec.relSent, rec.discard = at, discard
	}
}

func (tr *tracker) releaseAcked(rec *leaseRec, at time.Time) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if rec.relAck.IsZero() {
		rec.relAck = at
		tr.releases++
		if rec.discard {
			tr.discards++
		}
	}
}

func (tr *tracker) isEnded(rec *leaseRec) bool {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return !rec.endedAt.IsZero()
}

// check judges one answer about an acknowledged lease: v, or notFound for a
// 404, to a request sent at sent and answered at recv, by who.
func (tr *tracker) check(rec *leaseRec, v pool.LeaseView, notFound bool, sent, recv time.Time, who string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.reads++
	holderAsked := !rec.relSent.IsZero() && rec.relSent.Before(recv)
	released := !rec.relAck.IsZero() && rec.relAck.Before(sent)
	endedBefore := !rec.endedAt.IsZero() && rec.endedAt.Before(sent)
	desc := fmt.Sprintf("lease %s (client %d, token %s, acknowledged active on %s at %s, acknowledged expiry %s)",
		rec.id, rec.client, rec.token, rec.instance, ts(rec.ackAt), ts(rec.expires))
	if notFound {
		if !holderAsked {
			tr.violate("lost", "%s: %s read at %s answered 404: the server forgot it", desc, who, ts(recv))
		}
		return
	}
	switch v.State {
	case pool.LeaseActive, pool.LeasePending:
		if released {
			tr.undoneReads++
			tr.violate("release_undone", "%s: released (204 at %s), but %s read at %s answered %s", desc, ts(rec.relAck), who, ts(recv), v.State)
			return
		}
		if endedBefore {
			tr.violate("resurrected", "%s: read %s at %s, but %s read at %s answered %s", desc, rec.endState, ts(rec.endedAt), who, ts(recv), v.State)
			return
		}
		if v.State == pool.LeasePending {
			if !holderAsked {
				tr.violate("lost", "%s: %s read at %s answered pending", desc, who, ts(recv))
			}
			return
		}
		if v.Instance == nil || v.Instance.ID != rec.instance {
			got := "no instance"
			if v.Instance != nil {
				got = v.Instance.ID
			}
			tr.violate("lost", "%s: %s read at %s answered active on %s", desc, who, ts(recv), got)
		}
	default:
		if rec.endedAt.IsZero() {
			rec.endedAt, rec.endState = recv, v.State
		}
		if holderAsked {
			return
		}
		switch v.State {
		case pool.LeaseExpired:
			if !recv.After(rec.expires) {
				tr.violate("lost", "%s: %s read at %s answered expired, before its acknowledged expiry", desc, who, ts(recv))
			} else if !rec.counted {
				rec.counted = true
				tr.expired++
			}
		case pool.LeaseLost:
			if !rec.counted {
				rec.counted = true
				tr.endedLost++
			}
		default:
			tr.violate("lost", "%s: %s read at %s answered %s though its holder never asked for a release", desc, who, ts(recv), v.State)
		}
	}
}

// ---------------------------------------------------------------------------
// Reads shared by clients and the observer.

func isNotFound(err error) bool {
	var e *api.Error
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

func isAPIError(err error) (*api.Error, bool) {
	var e *api.Error
	ok := errors.As(err, &e)
	return e, ok
}

// read reads rec's lease once and judges the answer. It returns the view,
// and false when the server could not be asked.
func (h *harness) read(ctx context.Context, rec *leaseRec, who string) (pool.LeaseView, bool) {
	sent := time.Now()
	v, err := h.client.GetLease(ctx, rec.id, 0)
	recv := time.Now()
	switch {
	case err == nil:
		h.tr.check(rec, v, false, sent, recv, who)
		return v, true
	case isNotFound(err):
		h.tr.check(rec, v, true, sent, recv, who)
		return v, true
	}
	return v, false
}

// confirmDouble reads recs in two passes and reports every instance that
// two of them name while active in both passes.
func (h *harness) confirmDouble(ctx context.Context, recs []*leaseRec, who string) {
	h.tr.mu.Lock()
	h.tr.doubleChecks++
	h.tr.mu.Unlock()
	pass := func() (map[string][]string, bool) {
		m := map[string][]string{}
		for _, r := range recs {
			v, ok := h.read(ctx, r, who)
			if !ok {
				return nil, false
			}
			if v.State == pool.LeaseActive && v.Instance != nil {
				m[v.Instance.ID] = append(m[v.Instance.ID], r.id)
			}
		}
		return m, true
	}
	p1, ok := pass()
	if !ok {
		return
	}
	at := time.Now()
	p2, ok := pass()
	if !ok {
		return
	}
	for inst, ids := range p2 {
		var both []string
		for _, id := range ids {
			for _, id1 := range p1[inst] {
				if id == id1 {
					both = append(both, id)
				}
			}
		}
		if len(both) < 2 {
			continue
		}
		sort.Strings(both)
		key := inst + " " + strings.Join(both, " ")
		h.tr.mu.Lock()
		if !h.tr.doubles[key] {
			h.tr.doubles[key] = true
			var parts []string
			for _, id := range both {
				r := h.tr.leases[id]
				parts = append(parts, fmt.Sprintf("%s (client %d, token %s, acknowledged %s)", id, r.client, r.token, ts(r.ackAt)))
			}
			h.tr.violate("double_assignment", "instance %s: leases %s all active at %s (found by %s)", inst, strings.Join(parts, " and "), ts(at), who)
		}
		h.tr.mu.Unlock()
	}
}

// ---------------------------------------------------------------------------
// Clients.

func (h *harness) runClient(ctx context.Context, i int) {
	rng := rand.New(rand.NewPCG(h.seed, uint64(i)))
	for k := 0; !h.stopping.Load(); k++ {
		token := fmt.Sprintf("chaos-c%02d-%04d", i, k)
		rec := h.acquire(ctx, rng, i, token)
		if rec == nil {
			continue
		}
		if others := h.tr.othersOn(rec); len(others) > 0 {
			h.confirmDouble(ctx, append(others, rec), fmt.Sprintf("client %d at its acknowledgement", i))
		}
		if h.hold(ctx, rng, i, rec) {
			h.release(ctx, rng, i, rec)
		}
	}
}

// acquire leases with token until it is acknowledged active (returned), or
// the lease ends before that, or the test stops (nil; a pending lease is
// then canceled).
func (h *harness) acquire(ctx context.Context, rng *rand.Rand, i int, token string) *leaseRec {
	pendingID := ""
	sentOnce := false
	for {
		stopping := h.stopping.Load()
		if stopping && !sentOnce {
			return nil
		}
		wait := "3s"
		if stopping {
			wait = "0s"
		}
		var v pool.LeaseView
		var err error
		if pendingID != "" && !stopping {
			v, err = h.client.GetLease(ctx, pendingID, 3*time.Second)
		} else {
			sentOnce = true
			v, err = h.client.Lease(ctx, api.LeaseRequest{Pool: poolName, Wait: wait, ClientToken: token})
		}
		recv := time.Now()
		if err != nil {
			if e, ok := isAPIError(err); ok {
				h.tr.mu.Lock()
				if e.Status == http.StatusNotFound && pendingID != "" {
					// A pending lease never acknowledged active: the server
					// may forget it (its record was not yet on disk).
					h.tr.forgottenPending++
				} else {
					h.tr.apiErrors++
				}
				h.tr.mu.Unlock()
			} else {
				h.tr.mu.Lock()
				h.tr.connErrors++
				h.tr.mu.Unlock()
			}
			// The same client token again: it finds the lease if the server
			// has it, or makes it.
			pendingID = ""
			if ctx.Err() != nil {
				return nil
			}
			time.Sleep(time.Duration(30+rng.IntN(200)) * time.Millisecond)
			continue
		}
		switch v.State {
		case pool.LeaseActive:
			return h.tr.ack(i, token, v, recv)
		case pool.LeasePending:
			pendingID = v.ID
			if stopping {
				h.cancelPending(ctx, v.ID)
				return nil
			}
		default:
			h.tr.mu.Lock()
			h.tr.endedBeforeAck++
			h.tr.mu.Unlock()
			return nil
		}
	}
}

func (h *harness) cancelPending(ctx context.Context, id string) {
	for try := 0; try < 200 && ctx.Err() == nil; try++ {
		err := h.client.Release(ctx, id, false)
		if err == nil || isNotFound(err) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// hold keeps the lease a while, renewing it now and then; some leases are
// abandoned (not renewed) past their TTL. It returns false when the lease
// ended under it, with no release to make.
func (h *harness) hold(ctx context.Context, rng *rand.Rand, i int, rec *leaseRec) bool {
	who := fmt.Sprintf("client %d", i)
	abandon := rng.IntN(10) == 0
	d := time.Duration(100+rng.IntN(3900)) * time.Millisecond
	if abandon {
		d = leaseTTL + 1500*time.Millisecond
	}
	deadline := time.Now().Add(d)
	for !h.stopping.Load() || abandon {
		left := time.Until(deadline)
		if left <= 0 {
			break
		}
		time.Sleep(min(left, time.Duration(400+rng.IntN(800))*time.Millisecond))
		if abandon || rng.IntN(10) >= 7 {
			continue
		}
		sent := time.Now()
		v, err := h.client.Renew(ctx, rec.id)
		recv := time.Now()
		switch {
		case err == nil:
			h.tr.renewed(rec, v)
			h.tr.check(rec, v, false, sent, recv, who+" renew")
		case isNotFound(err):
			h.tr.check(rec, v, true, sent, recv, who+" renew")
			return false
		default:
			if e, ok := isAPIError(err); ok && e.Status == http.StatusConflict {
				// Ended: read what it became.
				h.read(ctx, rec, who+" after a 409 to renew")
			}
		}
		if h.tr.isEnded(rec) {
			return false
		}
	}
	if abandon {
		h.read(ctx, rec, who+" after abandoning")
	}
	return true
}

// release releases rec until a 204.
func (h *harness) release(ctx context.Context, rng *rand.Rand, i int, rec *leaseRec) {
	discard := rng.IntN(3) == 0
	for try := 0; ctx.Err() == nil; try++ {
		sent := time.Now()
		h.tr.releaseSent(rec, discard, sent)
		err := h.client.Release(ctx, rec.id, discard)
		recv := time.Now()
		if err == nil {
			h.tr.releaseAcked(rec, recv)
			return
		}
		if isNotFound(err) {
			h.tr.check(rec, pool.LeaseView{}, true, sent, recv, fmt.Sprintf("client %d release", i))
			return
		}
		if try > 600 {
			h.tr.mu.Lock()
			h.tr.violate("bad_answer", "client %d: releasing %s never got a 204; last error: %v", i, rec.id, err)
			h.tr.mu.Unlock()
			return
		}
		time.Sleep(time.Duration(30+rng.IntN(200)) * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------
// Observer.

func (h *harness) observe(ctx context.Context) {
	for round := 0; ctx.Err() == nil; round++ {
		h.observeOnce(ctx, round%5 == 0)
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (h *harness) observeOnce(ctx context.Context, cloud bool) {
	if insts, err := h.client.Instances(ctx, poolName); err == nil {
		h.tr.mu.Lock()
		h.tr.storeScans++
		h.tr.maxStore = max(h.tr.maxStore, len(insts))
		if len(insts) > maxInstances {
			var desc []string
			for _, in := range insts {
				desc = append(desc, fmt.Sprintf("%s %s (%s)", in.ID, in.State, in.Reason))
			}
			h.tr.violate("max_instances_store", "GET /v1/instances listed %d instances at %s: %s", len(insts), ts(time.Now()), strings.Join(desc, ", "))
		}
		h.tr.mu.Unlock()
	}
	active := map[string][]*leaseRec{}
	for _, rec := range h.tr.watchList(8) {
		v, ok := h.read(ctx, rec, "observer")
		if !ok {
			return // the server is down; try again next round
		}
		if v.State == pool.LeaseActive && v.Instance != nil {
			active[v.Instance.ID] = append(active[v.Instance.ID], rec)
		}
	}
	for _, recs := range active {
		if len(recs) > 1 {
			h.confirmDouble(ctx, recs, "observer")
		}
	}
	if cloud {
		h.checkCloud()
	}
}

func (h *harness) checkCloud() {
	recs, procs := h.cloudCount()
	h.tr.mu.Lock()
	defer h.tr.mu.Unlock()
	h.tr.cloudScans++
	h.tr.maxCloudRecs = max(h.tr.maxCloudRecs, len(recs))
	h.tr.maxCloudProcs = max(h.tr.maxCloudProcs, len(procs))
	// One violation per set of instances seen over the limit.
	if len(recs) > maxInstances {
		var ids []string
		for id, st := range recs {
			ids = append(ids, id+":"+st)
		}
		sort.Strings(ids)
		if key := "recs " + strings.Join(ids, " "); !h.tr.doubles[key] {
			h.tr.doubles[key] = true
			stale := 0
			for id, st := range recs {
				if _, ok := procs[id]; !ok && st == "terminating" {
					stale++
				}
			}
			h.tr.violate("max_instances_cloud_records", "the local cloud had %d instances not terminated at %s (%d of them terminating with no process left): %s",
				len(recs), ts(time.Now()), stale, strings.Join(ids, ", "))
		}
	}
	if len(procs) > maxInstances {
		ids := make([]string, 0, len(procs))
		for id := range procs {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		if key := "procs " + strings.Join(ids, " "); !h.tr.doubles[key] {
			h.tr.doubles[key] = true
			h.tr.violate("max_instances_cloud_procs", "%d instances had live processes at %s: %s", len(procs), ts(time.Now()), strings.Join(ids, ", "))
		}
	}
}

// ---------------------------------------------------------------------------
// The run.

func (h *harness) run() {
	t := h.t
	if !h.straceOK {
		t.Logf("no run under strace: %s", h.straceWhy)
	}
	rng := rand.New(rand.NewPCG(h.seed, 1<<40))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	h.startServer(false, 0)
	obsCtx, stopObs := context.WithCancel(ctx)
	var obsWG, clientWG sync.WaitGroup
	obsWG.Add(1)
	go func() {
		defer obsWG.Done()
		h.observe(obsCtx)
	}()
	for i := 0; i < numClients; i++ {
		clientWG.Add(1)
		go func() {
			defer clientWG.Done()
			h.runClient(ctx, i)
		}()
	}

	chaosStart := time.Now()
	for h.kills < targetKills && time.Since(chaosStart) < maxChaos {
		p := h.srv
		if p.strace {
			// A slowed server needs longer for the same work.
			time.Sleep(time.Duration(300+rng.IntN(700)) * time.Millisecond)
		}
		switch {
		case p.strace && rng.IntN(4) != 0:
			// Right after an assignment: both its records are queued, the
			// first may be on disk, the second not yet.
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond)
			if h.waitEvent("lease fulfilled", 3*time.Second) {
				h.triggered++
			}
			time.Sleep(time.Duration(rng.IntN(2*p.delayUS)) * time.Microsecond)
		case rng.IntN(2) == 0:
			time.Sleep(time.Duration(300+rng.IntN(2200)) * time.Millisecond)
		default:
			// Some time to get going, then the next line of one kind, then
			// a few milliseconds: while that decision's commits are in flight.
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond)
			if h.waitEvent(logKinds[rng.IntN(len(logKinds))], 2500*time.Millisecond) {
				h.triggered++
			}
			lag := time.Duration(rng.IntN(3000)) * time.Microsecond
			if p.strace {
				lag = time.Duration(rng.IntN(3*p.delayUS)) * time.Microsecond
			}
			time.Sleep(lag)
		}
		h.kill9(p)
		h.kills++
		if p.strace {
			h.straceKills++
		}
		time.Sleep(time.Duration(rng.IntN(200)) * time.Millisecond)
		useStrace := h.straceOK && h.kills%2 == 1
		delay := []int{2000, 4000, 8000, 12000}[rng.IntN(4)]
		if useStrace {
			h.straceRuns++
		}
		h.startServer(useStrace, delay)
	}
	chaosTime := time.Since(chaosStart)
	if h.srv.strace {
		// The last server stays up: no strace for it.
		h.kill9(h.srv)
		h.kills++
		h.straceKills++
		h.startServer(false, 0)
	}
	t.Logf("chaos phase: %d kills in %s; the last server stays up", h.kills, chaosTime.Round(time.Millisecond))

	// Clients finish what they hold and stop.
	h.stopping.Store(true)
	done := make(chan struct{})
	go func() {
		clientWG.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		cancel()
		<-done
		t.Errorf("clients did not finish within 60s of the end of the chaos")
	}
	stopObs()
	obsWG.Wait()

	// Every lease, read once more: nothing released is active again, and
	// no instance is named by two active leases.
	active := map[string][]*leaseRec{}
	for _, rec := range h.tr.snapshot() {
		if v, ok := h.read(ctx, rec, "final pass"); ok && v.State == pool.LeaseActive && v.Instance != nil {
			active[v.Instance.ID] = append(active[v.Instance.ID], rec)
		}
	}
	for _, recs := range active {
		if len(recs) > 1 {
			h.confirmDouble(ctx, recs, "final pass")
		}
	}
	h.observeOnce(ctx, true)
	h.checkStranded(ctx)
	h.scaleToZero(ctx)

	h.stopServer(h.srv)
	out, err := exec.Command(h.bin, "local", "terminate-all", "--config", h.cfgPath).CombinedOutput()
	if err != nil {
		t.Errorf("hangar local terminate-all: %v\n%s", err, out)
	}
	h.terminateAllOut = strings.TrimSpace(string(out))
	if procs := h.instanceProcs(); len(procs) > 0 {
		t.Errorf("instance processes survive `hangar local terminate-all`: %v", procs)
	}
}

// waitEvent waits for the next server log line of kind, reporting whether
// one came within d.
func (h *harness) waitEvent(kind string, d time.Duration) bool {
	drain(h.events)
	timeout := time.After(d)
	for {
		select {
		case k := <-h.events:
			if k == kind {
				return true
			}
		case <-timeout:
			return false
		}
	}
}

func drain(c chan string) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

// checkStranded looks for instances the server still counts on that can no
// longer serve: one it lists as booting although its bootstrap was told its
// ready report was taken (the bootstrap does not report ready twice), or
// one it lists as booting, idle, leased or releasing although its bootstrap
// was refused with a 401, or told to terminate, and stopped: states never
// go back from terminating, so the server undid a decision it had acted on.
func (h *harness) checkStranded(ctx context.Context) {
	insts, err := h.client.Instances(ctx, poolName)
	if err != nil {
		h.t.Errorf("listing instances: %v", err)
		return
	}
	for _, in := range insts {
		switch in.State {
		case pool.Booting, pool.Idle, pool.Leased, pool.Releasing:
		default:
			continue
		}
		console, err := os.ReadFile(filepath.Join(h.localDir, "instances", in.ID, "console.log"))
		if err != nil {
			continue
		}
		var why string
		switch {
		case bytes.Contains(console, []byte("no longer knows this instance")):
			why = "its bootstrap was refused (401) and stopped"
		case bytes.Contains(console, []byte("Hangar asked this instance to terminate")):
			why = "its bootstrap was told to terminate, stopped its worker and exited"
		case in.State == pool.Booting && bytes.Contains(console, []byte("reported ready to")):
			why = "its bootstrap's ready report was answered 2xx, and it will not report again"
		default:
			continue
		}
		h.tr.mu.Lock()
		h.tr.violate("instance_stranded", "instance %s is %s since %s (%s) on the server, but %s; console tail:\n%s",
			in.ID, in.State, ts(in.Since), in.Reason, why, tail(filepath.Join(h.localDir, "instances", in.ID, "console.log"), 8))
		h.tr.mu.Unlock()
	}
}

// scaleToZero scales the pool in, lets the reaper take the idle instances,
// drains what it leaves, and counts what is still running.
func (h *harness) scaleToZero(ctx context.Context) {
	t := h.t
	zero := 0
	if _, err := h.client.Scale(ctx, poolName, api.ScaleRequest{MinIdle: &zero, MaxInstances: &zero}); err != nil {
		h.scaleZeroAnswer = err.Error()
	} else {
		h.scaleZeroAnswer = "accepted"
	}
	if _, err := h.client.Scale(ctx, poolName, api.ScaleRequest{MinIdle: &zero}); err != nil {
		t.Errorf("scaling %s to min_idle 0: %v", poolName, err)
	}
	empty := func() bool {
		insts, err := h.client.Instances(ctx, poolName)
		if err != nil || len(insts) > 0 {
			return false
		}
		recs, procs := h.cloudRecords(), h.instanceProcs()
		return len(recs) == 0 && len(procs) == 0
	}
	reaped := waitUntil(10*time.Second, empty)
	if !reaped {
		insts, _ := h.client.Instances(ctx, poolName)
		var desc []string
		for _, in := range insts {
			desc = append(desc, fmt.Sprintf("%s %s since %s (%s, lease %q)", in.ID, in.State, ts(in.Since), in.Reason, in.LeaseID))
			t.Logf("console of %s, which the reaper left %s:\n%s", in.ID, in.State, tail(filepath.Join(h.localDir, "instances", in.ID, "console.log"), 12))
			if _, err := h.client.Drain(ctx, in.ID); err != nil {
				t.Logf("draining %s: %v", in.ID, err)
			}
		}
		h.notReaped = desc
		waitUntil(20*time.Second, empty)
	}
	recs, procs := h.cloudRecords(), h.instanceProcs()
	insts, _ := h.client.Instances(ctx, poolName)
	h.tr.mu.Lock()
	defer h.tr.mu.Unlock()
	for id, pids := range procs {
		h.tr.violate("left_after_scale_to_zero", "instance %s (%s on the local cloud) still has processes %v", id, orDefault(recs[id], "terminated"), pids)
	}
	for id, st := range recs {
		if _, ok := procs[id]; !ok {
			h.staleRecords = append(h.staleRecords, id+":"+st)
		}
	}
	sort.Strings(h.staleRecords)
	for _, in := range insts {
		h.serverLeft = append(h.serverLeft, fmt.Sprintf("%s %s (%s)", in.ID, in.State, in.Reason))
	}
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func waitUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
	return true
}

// report logs the figures and fails the test for every violation.
func (h *harness) report(wall time.Duration) {
	t := h.t
	tr := h.tr
	tr.mu.Lock()
	defer tr.mu.Unlock()
	t.Logf("figures: wall time %s; server runs %d, kills %d (under strace %d, strace runs %d, log-triggered %d)",
		wall.Round(time.Millisecond), h.runs, h.kills, h.straceKills, h.straceRuns, h.triggered)
	t.Logf("figures: leases acknowledged %d, releases acknowledged %d (discard %d), renews acknowledged %d, expired after their acknowledged expiry %d, ended lost by the server %d",
		tr.acked, tr.releases, tr.discards, tr.renews, tr.expired, tr.endedLost)
	t.Logf("figures: lease reads judged %d, double-assignment checks %d, store scans %d (max %d instances), cloud scans %d (max %d not terminated, max %d with processes), limit %d",
		tr.reads, tr.doubleChecks, tr.storeScans, tr.maxStore, tr.cloudScans, tr.maxCloudRecs, tr.maxCloudProcs, maxInstances)
	t.Logf("figures: client connection errors %d, other API errors %d, pending leases forgotten before acknowledgement %d, leases ended before acknowledgement %d",
		tr.connErrors, tr.apiErrors, tr.forgottenPending, tr.endedBeforeAck)
	t.Logf("scale to zero: PATCH max_instances=0 answered %q; instances the reaper left (then drained): %d %v; the server still listed %d %v; local-cloud records left not terminated without processes: %d %v; terminate-all said %q",
		h.scaleZeroAnswer, len(h.notReaped), h.notReaped, len(h.serverLeft), h.serverLeft, len(h.staleRecords), h.staleRecords, h.terminateAllOut)
	var parts []string
	for _, k := range violationKinds {
		parts = append(parts, fmt.Sprintf("%s %d", k, len(tr.viols[k])))
	}
	t.Logf("violations: %s", strings.Join(parts, ", "))
	if h.kills < minKills {
		t.Errorf("only %d kills within %s; want ≥ %d", h.kills, maxChaos, minKills)
	}
	// The instances came in batches: each enrolled with its batch's token.
	serveLog, _ := os.ReadFile(h.logPath)
	enrolled := strings.Count(string(serveLog), "instance enrolled")
	t.Logf("figures: instances enrolled from batches %d", enrolled)
	if enrolled == 0 {
		t.Error("no instance enrolled: the pool launched no batch")
	}
	for _, k := range violationKinds {
		for i, v := range tr.viols[k] {
			if i < 10 {
				t.Errorf("%s: %s", k, v)
			} else if i == 10 {
				t.Errorf("%s: … and %d more", k, len(tr.viols[k])-10)
			}
		}
	}
	// The server's side of the first two violations of each kind.
	for _, k := range violationKinds {
		for i, v := range tr.viols[k] {
			if i >= 2 {
				break
			}
			ids := idRE.FindAllString(v, -1)
			if k == "max_instances_cloud_records" {
				ids = nil // the ones terminating are the story
				for _, m := range terminatingRE.FindAllStringSubmatch(v, -1) {
					ids = append(ids, m[1])
				}
			}
			if len(ids) > 0 {
				t.Logf("server log about %s #%d (%s):\n%s", k, i+1, strings.Join(dedupe(ids), " "), h.logGrep(40, dedupe(ids)...))
			}
		}
	}
	if dst := os.Getenv("HANGAR_CHAOS_LOG"); dst != "" {
		h.logMu.Lock()
		b, _ := os.ReadFile(h.logPath)
		h.logMu.Unlock()
		if err := os.WriteFile(dst, b, 0o600); err != nil {
			t.Errorf("copying the server log to HANGAR_CHAOS_LOG: %v", err)
		} else {
			t.Logf("server log copied to %s", dst)
		}
	}
}

// idRE matches instance and lease ids; terminatingRE an instance listed as
// terminating in a max_instances_cloud_records violation.
var (
	idRE          = regexp.MustCompile(`\bi-[0-9a-f]{17}\b|\bl-[A-Za-z0-9_-]{16}`)
	terminatingRE = regexp.MustCompile(`(i-[0-9a-f]{17}):terminating`)
)

func dedupe(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}
