// Package bootstrap serves the instance-facing endpoints: the pool's
// bootstrap script (the runurl step of the user-data), the ready report, the
// assignment long-poll, heartbeats, and the output and exit status of
// commands run on a lease (`hangar run`).
//
// Every call carries the instance's bootstrap token as a bearer token. Only a
// hash of it is kept; it is bound to one instance and dies with it, and a
// released answer may replace it (Assignment.NewToken). An instance of a
// batched launch starts with its batch's enrollment token instead, which
// opens only the script and enroll routes: enroll exchanges it, with the
// instance's id, for the instance's own token. Assignments and the enroll
// answer are written as shell assignments, each value quoted by
// shell.Quote, so that a bash-and-curl bootstrap can source them.
package bootstrap

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/internal/shell"
)

// Ready is an instance's report that its bootstrap runs.
type Ready struct {
	SSHHostKey string
	Hostname   string
}

// Assignment states, as the instance sees them.
const (
	AssignNone      = "none"      // nothing changed: poll again
	AssignAssigned  = "assigned"  // start the worker for this lease
	AssignReleased  = "released"  // stop the worker, clean up, poll with an empty current
	AssignTerminate = "terminate" // stop everything and exit
	// AssignSaveCache: the instance is ending and its cache volume is to
	// be snapshotted: stop the worker, flush the cache's filesystem (and
	// freeze it where it can), then poll with cache=saved.
	AssignSaveCache = "save-cache"
	// AssignSyncCache: the idle instance's cache is to be snapshotted
	// while it lives (hangar cache snapshot, the cache's refresh): flush
	// it, then poll with cache=synced.
	AssignSyncCache = "sync-cache"
)

// What a poll's cache= says the bootstrap has done to its cache, as
// AssignSyncCache and AssignSaveCache asked.
const (
	CacheSynced = "synced" // flushed
	CacheSaved  = "saved"  // worker stopped, flushed and frozen where it could be
)

// Assignment is what an instance is told to do.
type Assignment struct {
	State          string
	LeaseID        string
	WorkerName     string
	WorkerPassword string
	WorkerMaster   string
	WorkerCommand  string
	CleanupCommand string
	// RunID and RunCommand are set when the lease has a command for the
	// instance to run (IDs count from 1 within a lease). RunCommand is one
	// shell command line, each argument quoted by shell.Quote. An
	// assignment with a run may repeat the instance's current lease: it
	// then asks for one more run on it.
	RunID      int
	RunCommand string
	// NewToken, when set, replaces the instance's bootstrap token (the
	// server rotates it at each release, so that a build that read the
	// token cannot use it once its lease is over). The bootstrap saves it
	// before it does anything else with the answer, and every later call
	// carries it; the old token is refused from the moment the answer is
	// built.
	NewToken string
	// WorkerUser, when set (assigned and released answers), is the local
	// user the worker, the runs and the cleanup command run as; the
	// bootstrap, running as root, creates it when missing.
	WorkerUser string
}

// Poll is an instance's assignment long-poll.
type Poll struct {
	// Current is the lease the instance's worker runs for ("" for none).
	Current string
	// Run is the last run of Current the instance started (0 for none; -1
	// when its bootstrap does not take runs, so it is never asked for a
	// second run on a lease).
	Run int
	// Rotate: the bootstrap takes rotated tokens (rotate=1), so a released
	// answer may carry a new one. Bootstraps that do not say so keep
	// their token for the instance's life.
	Rotate bool
	Wait   time.Duration
	// TokenHash is the hash of the token the poll came with: a rotated
	// token is only settled once the instance uses it.
	TokenHash string
	// Cache is what the poll's cache= says: "", CacheSynced or CacheSaved.
	Cache string
}

// Heartbeat is an instance's periodic sign of life.
type Heartbeat struct {
	LeaseID  string
	Worker   string // running | exited | none
	ExitCode int
	// RunID and RunExitCode, when RunID is not 0, report a run of LeaseID
	// that has exited: the exit status again, in case its own report was
	// lost (a server restart).
	RunID       int
	RunExitCode int
}

// Backend is what the endpoints need from the pool manager.
type Backend interface {
	// Authenticate maps a token's SHA-256 hash (hex) to the instance it
	// belongs to, or returns ErrUnauthorized.
	Authenticate(tokenHash string) (instance string, err error)
	// Script returns the bootstrap script of the instance's pool.
	Script(ctx context.Context, instance string) ([]byte, error)
	Ready(ctx context.Context, instance string, r Ready) error
	// Assignment waits up to p.Wait for something to change relative to
	// what the poll says the instance runs.
	Assignment(ctx context.Context, instance string, p Poll) (Assignment, error)
	Heartbeat(ctx context.Context, instance string, hb Heartbeat) error
	// OpenOutput returns where the output of run of lease goes, which must
	// be a run of the instance's current lease that has not exited; else
	// ErrNotCurrent. Writes fail with ErrNotCurrent once the lease ends or
	// the run's exit is recorded.
	OpenOutput(ctx context.Context, instance, lease string, run int) (io.Writer, error)
	// Exit records the exit status of run of lease, under the same rule.
	// Reporting the same status again is not an error.
	Exit(ctx context.Context, instance, lease string, run, code int) error
	// AuthenticateBatch maps a live batch enrollment token's hash to the
	// pool whose instances it may enroll, or returns ErrUnauthorized. A
	// batch token opens only the script and enroll routes.
	AuthenticateBatch(tokenHash string) (pool string, err error)
	// Enroll gives an instance of a batch its own bootstrap token, once:
	// the instance id must be one the cloud returned for the batch (or
	// lists under its intent tag) and not enrolled before (see
	// docs/design.md, "Batched launches and enrollment"). ErrEnrollPending
	// while the launch has not answered yet; ErrUnauthorized for every
	// refusal.
	//
	// Enroll logs its own refusals, with why; the handler logs those it
	// makes itself (no batch token, or one AuthenticateBatch refused).
	Enroll(ctx context.Context, batchTokenHash string, e Enrollment) (token string, err error)
}

// PoolScripter is implemented by a Backend whose batch tokens open the
// script route: PoolScript returns the bootstrap script of a pool by name,
// as AuthenticateBatch returned it. Without it, the script route refuses
// batch tokens like any unknown token.
type PoolScripter interface {
	PoolScript(ctx context.Context, pool string) ([]byte, error)
}

// Enrollment is what an instance of a batched launch presents.
type Enrollment struct {
	InstanceID string
	// EnrollKey is a random value the instance keeps: presenting it again
	// recovers an answer that was lost, and nothing else does.
	EnrollKey string
	// Document and Signature are the cloud's signed instance identity,
	// when the pool asks for it (identity = "signed").
	Document, Signature []byte
	RemoteAddr          string
}

var (
	// ErrUnauthorized: no such token, or its instance is gone.
	ErrUnauthorized = errors.New("unknown or revoked bootstrap token")
	// ErrNotCurrent: an instance wrote to a run that is not, or is no
	// longer, one of its current lease's.
	ErrNotCurrent = errors.New("not a run under way on this instance's current lease")
	// ErrEnrollPending: the batch's launch has not answered yet, so the
	// instance id cannot be checked; ask again shortly.
	ErrEnrollPending = errors.New("the launch of this batch has not answered yet")
)

// BrokenMarker goes into a run's output where an upload broke off: what
// the instance had sent but Hangar had not received is missing there.
const BrokenMarker = "\n[hangar: the upload of this output broke off here; some output may be missing]\n"

// tokenHashKey carries the hash of the request's token in its context.
type tokenHashKey struct{}

// HashToken is how tokens are stored and looked up.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// MaxWait caps an assignment long-poll.
const MaxWait = 5 * time.Minute

// Handler serves /bootstrap/v1/.
func Handler(b Backend, log *slog.Logger) http.Handler {
	h := &handler{b: b, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /bootstrap/v1/script", h.script)
	mux.HandleFunc("POST /bootstrap/v1/enroll", h.enroll)
	mux.HandleFunc("POST /bootstrap/v1/ready", h.auth(h.ready))
	mux.HandleFunc("GET /bootstrap/v1/assignment", h.auth(h.assignment))
	mux.HandleFunc("POST /bootstrap/v1/heartbeat", h.auth(h.heartbeat))
	mux.HandleFunc("PUT /bootstrap/v1/output", h.authStream(h.output))
	mux.HandleFunc("POST /bootstrap/v1/exit", h.auth(h.exit))
	return mux
}

type handler struct {
	b   Backend
	log *slog.Logger
}

// maxForm bounds what an instance may send: a host key and a few fields.
const maxForm = 16 << 10

func (h *handler) auth(next func(w http.ResponseWriter, r *http.Request, instance string)) http.HandlerFunc {
	return h.authLimit(maxForm, next)
}

// authStream is auth for a body of any length: a run's output, streamed
// for as long as the command runs.
func (h *handler) authStream(next func(w http.ResponseWriter, r *http.Request, instance string)) http.HandlerFunc {
	return h.authLimit(0, next)
}

// authLimit is auth with bodies cut at limit bytes (0: no limit).
func (h *handler) authLimit(limit int64, next func(w http.ResponseWriter, r *http.Request, instance string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || token == "" {
			http.Error(w, "missing bootstrap token", http.StatusUnauthorized)
			return
		}
		hash := HashToken(token)
		instance, err := h.b.Authenticate(hash)
		if err != nil {
			http.Error(w, ErrUnauthorized.Error(), http.StatusUnauthorized)
			return
		}
		r = r.WithContext(context.WithValue(r.Context(), tokenHashKey{}, hash))
		if limit > 0 {
			r.Body = http.MaxBytesReader(w, r.Body, limit)
		}
		next(w, r, instance)
	}
}

func (h *handler) fail(w http.ResponseWriter, instance, what string, err error) {
	status := http.StatusInternalServerError
	msg := what + " failed"
	switch {
	case errors.Is(err, ErrUnauthorized):
		status = http.StatusUnauthorized
	case errors.Is(err, ErrNotCurrent):
		// Not secret, and it tells the instance to stop trying.
		status, msg = http.StatusConflict, what+" failed: "+err.Error()
	}
	h.log.Warn("bootstrap call failed", "instance", instance, "call", what, "err", err)
	http.Error(w, msg, status)
}

// script serves the pool's bootstrap script to an instance, or to an
// instance of a batched launch that has not enrolled yet: it fetches the
// script with the batch token, and the script enrolls.
func (h *handler) script(w http.ResponseWriter, r *http.Request) {
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || token == "" {
		http.Error(w, "missing bootstrap token", http.StatusUnauthorized)
		return
	}
	hash := HashToken(token)
	var body []byte
	instance, err := h.b.Authenticate(hash)
	if err == nil {
		body, err = h.b.Script(r.Context(), instance)
	} else {
		ps, ok := h.b.(PoolScripter)
		pool, berr := h.b.AuthenticateBatch(hash)
		if !ok || berr != nil {
			http.Error(w, ErrUnauthorized.Error(), http.StatusUnauthorized)
			return
		}
		instance = "(not enrolled) of pool " + pool
		body, err = ps.PoolScript(r.Context(), pool)
	}
	if err != nil {
		h.fail(w, instance, "script", err)
		return
	}
	w.Header().Set("Content-Type", "text/x-shellscript")
	_, _ = w.Write(body)
}

func (h *handler) ready(w http.ResponseWriter, r *http.Request, instance string) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad ready report: "+err.Error(), http.StatusBadRequest)
		return
	}
	rep := Ready{SSHHostKey: strings.TrimSpace(r.PostForm.Get("ssh_host_key")), Hostname: r.PostForm.Get("hostname")}
	if err := validHostKey(rep.SSHHostKey); err != nil {
		http.Error(w, "bad ready report: "+err.Error(), http.StatusBadRequest)
		return
	}
	if err := h.b.Ready(r.Context(), instance, rep); err != nil {
		h.fail(w, instance, "ready", err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// validHostKey accepts an OpenSSH public key line ("type base64 [comment]")
// or nothing; anything else from an instance is refused rather than pinned.
func validHostKey(k string) error {
	if k == "" {
		return nil
	}
	f := strings.Fields(k)
	if len(f) < 2 || !strings.HasPrefix(f[0], "ssh-") && !strings.HasPrefix(f[0], "ecdsa-") {
		return errors.New("ssh_host_key is not an OpenSSH public key")
	}
	return nil
}

func (h *handler) assignment(w http.ResponseWriter, r *http.Request, instance string) {
	wait := time.Duration(0)
	if s := r.URL.Query().Get("wait"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			http.Error(w, fmt.Sprintf("bad wait %q: want a duration such as 50s", s), http.StatusBadRequest)
			return
		}
		wait = min(d, MaxWait)
	}
	// A bootstrap that sends no run= does not know about runs.
	run := -1
	if s := r.URL.Query().Get("run"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			http.Error(w, fmt.Sprintf("bad run %q: want the number of the last run started, or 0", s), http.StatusBadRequest)
			return
		}
		run = n
	}
	rotate := false
	switch s := r.URL.Query().Get("rotate"); s {
	case "":
	case "1":
		rotate = true
	default:
		http.Error(w, fmt.Sprintf("bad rotate %q: want 1 or nothing", s), http.StatusBadRequest)
		return
	}
	// A poll with worker= carries the instance's heartbeat too, so that a
	// bootstrap needs one request a round, not two.
	if q := r.URL.Query(); q.Has("worker") {
		runExited := ""
		if q.Has("run_exit_code") {
			runExited = q.Get("run")
		}
		hb, err := parseHeartbeat(q.Get("current"), q.Get("worker"), q.Get("exit_code"), runExited, q.Get("run_exit_code"))
		if err != nil {
			http.Error(w, "bad heartbeat in the poll: "+err.Error(), http.StatusBadRequest)
			return
		}
		if err := h.b.Heartbeat(r.Context(), instance, hb); err != nil {
			h.fail(w, instance, "heartbeat", err)
			return
		}
	}
	cache := r.URL.Query().Get("cache")
	switch cache {
	case "", CacheSynced, CacheSaved:
	default:
		http.Error(w, fmt.Sprintf("bad cache %q: want %s, %s or nothing", cache, CacheSynced, CacheSaved), http.StatusBadRequest)
		return
	}
	hash, _ := r.Context().Value(tokenHashKey{}).(string)
	a, err := h.b.Assignment(r.Context(), instance, Poll{Current: r.URL.Query().Get("current"), Run: run, Rotate: rotate, Wait: wait,
		TokenHash: hash, Cache: cache})
	if err != nil {
		h.fail(w, instance, "assignment", err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = io.WriteString(w, a.Shell())
}

// Shell renders the assignment as lines a bootstrap script sources.
func (a Assignment) Shell() string {
	var b strings.Builder
	line := func(k, v string) { fmt.Fprintf(&b, "%s=%s\n", k, shell.Quote(v)) }
	line("HANGAR_ASSIGNMENT", a.State)
	// Fields added later are written only when set, so that answers
	// without them read exactly as before.
	if a.NewToken != "" {
		line("HANGAR_NEW_TOKEN", a.NewToken)
	}
	if a.WorkerUser != "" && (a.State == AssignAssigned || a.State == AssignReleased) {
		line("HANGAR_WORKER_USER", a.WorkerUser)
	}
	if a.State == AssignAssigned {
		line("HANGAR_LEASE_ID", a.LeaseID)
		line("HANGAR_WORKER_NAME", a.WorkerName)
		line("HANGAR_WORKER_PASSWORD", a.WorkerPassword)
		line("HANGAR_WORKER_MASTER", a.WorkerMaster)
		line("HANGAR_WORKER_COMMAND", a.WorkerCommand)
		// Only with a run, so that assignments without one read as before.
		if a.RunID != 0 {
			line("HANGAR_RUN_ID", strconv.Itoa(a.RunID))
			line("HANGAR_RUN_COMMAND", a.RunCommand)
		}
	}
	line("HANGAR_CLEANUP_COMMAND", a.CleanupCommand)
	return b.String()
}

func (h *handler) heartbeat(w http.ResponseWriter, r *http.Request, instance string) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad heartbeat: "+err.Error(), http.StatusBadRequest)
		return
	}
	f := r.PostForm.Get
	hb, err := parseHeartbeat(f("lease"), f("worker"), f("exit_code"), f("run"), f("run_exit_code"))
	if err != nil {
		http.Error(w, "bad heartbeat: "+err.Error(), http.StatusBadRequest)
		return
	}
	if err := h.b.Heartbeat(r.Context(), instance, hb); err != nil {
		h.fail(w, instance, "heartbeat", err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// parseHeartbeat reads a heartbeat's fields: the lease, the worker's state
// and exit status, and, when run is not "", a run of the lease that exited
// with runExit.
func parseHeartbeat(lease, worker, exit, run, runExit string) (Heartbeat, error) {
	hb := Heartbeat{LeaseID: lease, Worker: worker}
	switch worker {
	case "", "none", "running", "exited":
	default:
		return hb, errors.New("worker must be none, running or exited")
	}
	if exit != "" {
		n, err := strconv.Atoi(exit)
		if err != nil {
			return hb, errors.New("exit_code must be a number")
		}
		hb.ExitCode = n
	}
	if run != "" {
		n, err := strconv.Atoi(run)
		if err != nil || n < 1 {
			return hb, errors.New("run must be a run number")
		}
		code, err := exitCode(runExit)
		if err != nil {
			return hb, fmt.Errorf("run_exit_code %w", err)
		}
		hb.RunID, hb.RunExitCode = n, code
	}
	return hb, nil
}

// exitCode parses an exit status as a shell reports it: 0-255, where 128+N
// means killed by signal N.
func exitCode(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 255 {
		return 0, fmt.Errorf("must be a number from 0 to 255, not %q", s)
	}
	return n, nil
}

// runParams reads the lease and run a run's output or exit belongs to.
func runParams(v func(string) string) (lease string, run int, err error) {
	lease = v("lease")
	if lease == "" {
		return "", 0, errors.New("lease is required")
	}
	run, err = strconv.Atoi(v("run"))
	if err != nil || run < 1 {
		return "", 0, fmt.Errorf("run must be a run number, not %q", v("run"))
	}
	return lease, run, nil
}

// output appends the request body, as it arrives, to a run's output: the
// instance streams the command's output as one chunked upload. An upload
// that breaks off leaves a marker; the instance's retry continues after it.
func (h *handler) output(w http.ResponseWriter, r *http.Request, instance string) {
	lease, run, err := runParams(r.URL.Query().Get)
	if err != nil {
		http.Error(w, "bad output upload: "+err.Error(), http.StatusBadRequest)
		return
	}
	out, err := h.b.OpenOutput(r.Context(), instance, lease, run)
	if err != nil {
		h.fail(w, instance, "output", err)
		return
	}
	// An upload lasts as long as its command, which may also be silent for
	// as long as it likes (the bootstrap sends nothing then): the server's
	// read and write timeouts, made for requests and long polls, are lifted
	// for it, and a dead instance's connection ends by TCP keep-alive. A
	// server shutting down cuts it off rather than wait (the instance
	// uploads the rest again).
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	stop := context.AfterFunc(r.Context(), func() { _ = rc.SetReadDeadline(time.Now()) })
	defer stop()
	// The answer is small, yet must not wait forever on a stuck reader.
	defer func() { _ = rc.SetWriteDeadline(time.Now().Add(time.Minute)) }()
	buf := make([]byte, 32<<10)
	for {
		n, rerr := r.Body.Read(buf)
		if n > 0 {
			if _, err := out.Write(buf[:n]); err != nil {
				h.fail(w, instance, "output", err)
				return
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			// Whatever the instance sent after the last full read is lost.
			_, _ = out.Write([]byte(BrokenMarker))
			h.log.Warn("run output upload broke off", "instance", instance, "lease", lease, "run", run, "err", rerr)
			// Not a 2xx, which would tell the instance all had arrived:
			// it is to send the rest again.
			http.Error(w, "output upload broke off; send the rest again", http.StatusServiceUnavailable)
			return
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

// exit records a run's exit status. The instance reports it only once its
// output upload has finished, so Hangar then has all the output.
func (h *handler) exit(w http.ResponseWriter, r *http.Request, instance string) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad exit report: "+err.Error(), http.StatusBadRequest)
		return
	}
	lease, run, err := runParams(r.PostForm.Get)
	if err != nil {
		http.Error(w, "bad exit report: "+err.Error(), http.StatusBadRequest)
		return
	}
	code, err := exitCode(r.PostForm.Get("exit_code"))
	if err != nil {
		http.Error(w, "bad exit report: exit_code "+err.Error(), http.StatusBadRequest)
		return
	}
	if err := h.b.Exit(r.Context(), instance, lease, run, code); err != nil {
		h.fail(w, instance, "exit", err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
