// Package bootstrap serves the instance-facing endpoints: the pool's
// bootstrap script (the runurl step of the user-data), the ready report, the
// assignment long-poll and heartbeats.
//
// Every call carries the instance's bootstrap token as a bearer token. Only a
// hash of it is kept; it is bound to one instance and dies with it. The
// assignment is written as shell assignments, each value quoted by
// userdata.ShellQuote, so that a bash-and-curl bootstrap can source it.
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

	"github.com/hangar-ci/hangar/userdata"
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
}

// Heartbeat is an instance's periodic sign of life.
type Heartbeat struct {
	LeaseID  string
	Worker   string // running | exited | none
	ExitCode int
}

// Backend is what the endpoints need from the pool manager.
type Backend interface {
	// Authenticate maps a token's SHA-256 hash (hex) to the instance it
	// belongs to, or returns ErrUnauthorized.
	Authenticate(tokenHash string) (instance string, err error)
	// Script returns the bootstrap script of the instance's pool.
	Script(ctx context.Context, instance string) ([]byte, error)
	Ready(ctx context.Context, instance string, r Ready) error
	// Assignment waits up to wait for something to change relative to
	// current, the lease the instance's worker runs for ("" for none).
	Assignment(ctx context.Context, instance, current string, wait time.Duration) (Assignment, error)
	Heartbeat(ctx context.Context, instance string, hb Heartbeat) error
}

// ErrUnauthorized: no such token, or its instance is gone.
var ErrUnauthorized = errors.New("unknown or revoked bootstrap token")

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
	mux.HandleFunc("GET /bootstrap/v1/script", h.auth(h.script))
	mux.HandleFunc("POST /bootstrap/v1/ready", h.auth(h.ready))
	mux.HandleFunc("GET /bootstrap/v1/assignment", h.auth(h.assignment))
	mux.HandleFunc("POST /bootstrap/v1/heartbeat", h.auth(h.heartbeat))
	return mux
}

type handler struct {
	b   Backend
	log *slog.Logger
}

// maxForm bounds what an instance may send: a host key and a few fields.
const maxForm = 16 << 10

func (h *handler) auth(next func(w http.ResponseWriter, r *http.Request, instance string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || token == "" {
			http.Error(w, "missing bootstrap token", http.StatusUnauthorized)
			return
		}
		instance, err := h.b.Authenticate(HashToken(token))
		if err != nil {
			http.Error(w, ErrUnauthorized.Error(), http.StatusUnauthorized)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxForm)
		next(w, r, instance)
	}
}

func (h *handler) fail(w http.ResponseWriter, instance, what string, err error) {
	status := http.StatusInternalServerError
	if errors.Is(err, ErrUnauthorized) {
		status = http.StatusUnauthorized
	}
	h.log.Warn("bootstrap call failed", "instance", instance, "call", what, "err", err)
	http.Error(w, what+" failed", status)
}

func (h *handler) script(w http.ResponseWriter, r *http.Request, instance string) {
	body, err := h.b.Script(r.Context(), instance)
	if err != nil {
		h.fail(w, instance, "script", err)
		return
	}
	w.Header().Set("Content-Type", "text/x-shellscript")
	w.Write(body)
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
	a, err := h.b.Assignment(r.Context(), instance, r.URL.Query().Get("current"), wait)
	if err != nil {
		h.fail(w, instance, "assignment", err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	io.WriteString(w, a.Shell())
}

// Shell renders the assignment as lines a bootstrap script sources.
func (a Assignment) Shell() string {
	var b strings.Builder
	line := func(k, v string) { fmt.Fprintf(&b, "%s=%s\n", k, userdata.ShellQuote(v)) }
	line("HANGAR_ASSIGNMENT", a.State)
	if a.State == AssignAssigned {
		line("HANGAR_LEASE_ID", a.LeaseID)
		line("HANGAR_WORKER_NAME", a.WorkerName)
		line("HANGAR_WORKER_PASSWORD", a.WorkerPassword)
		line("HANGAR_WORKER_MASTER", a.WorkerMaster)
		line("HANGAR_WORKER_COMMAND", a.WorkerCommand)
	}
	line("HANGAR_CLEANUP_COMMAND", a.CleanupCommand)
	return b.String()
}

func (h *handler) heartbeat(w http.ResponseWriter, r *http.Request, instance string) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad heartbeat: "+err.Error(), http.StatusBadRequest)
		return
	}
	hb := Heartbeat{LeaseID: r.PostForm.Get("lease"), Worker: r.PostForm.Get("worker")}
	switch hb.Worker {
	case "", "none", "running", "exited":
	default:
		http.Error(w, "bad heartbeat: worker must be none, running or exited", http.StatusBadRequest)
		return
	}
	if s := r.PostForm.Get("exit_code"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			http.Error(w, "bad heartbeat: exit_code must be a number", http.StatusBadRequest)
			return
		}
		hb.ExitCode = n
	}
	if err := h.b.Heartbeat(r.Context(), instance, hb); err != nil {
		h.fail(w, instance, "heartbeat", err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
