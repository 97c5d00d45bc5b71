// Package api serves Hangar's HTTP lease API and is its Go client.
//
// Handlers return (value, error); one wrapper encodes the value as JSON (a
// run's output goes as it is) and maps errors to {"error": …, "code": …}
// with the matching status.
package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/pool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Roles a token can have. An admin token can do everything a lease token can.
const (
	RoleLease = "lease"
	RoleAdmin = "admin"
)

// Token is one bearer token the API accepts.
type Token struct {
	Name   string
	Role   string
	Secret string
}

// Error is an API error as it travels over the wire.
type Error struct {
	Status  int    `json:"-"`
	Message string `json:"error"`
	Code    string `json:"code"`
}

func (e *Error) Error() string { return e.Message }

func apiError(status int, code, format string, a ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, a...)}
}

// Server holds what the handlers need.
type Server struct {
	Manager *pool.Manager
	Log     *slog.Logger
	// Tokens are the accepted bearer tokens. None means open: every caller
	// is an admin. The caller decides whether that is allowed (loopback).
	Tokens   []Token
	Gatherer prometheus.Gatherer
	// MetricsPublic serves /metrics to callers without a token; otherwise
	// it takes a token of any role, as soon as there are tokens.
	MetricsPublic bool
	// Build is shown by /healthz?verbose.
	Build BuildInfo
}

// Handler returns the API's routes: /v1/…, /metrics, /healthz and the
// status page, /ui/.
func (s *Server) Handler() http.Handler { return s.mux() }

// mux builds Handler's routes; Routes lists their patterns.
func (s *Server) mux() *routeMux {
	auth := newAuth(s.Tokens)
	mux := &routeMux{ServeMux: http.NewServeMux()}
	route := func(pattern, role string, h handlerFunc) {
		mux.Handle(pattern, s.wrap(auth, role, h))
	}
	route("POST /v1/leases", RoleLease, s.createLease)
	route("GET /v1/leases", RoleLease, s.listLeases)
	route("GET /v1/leases/{id}", RoleLease, s.getLease)
	route("POST /v1/leases/{id}/renew", RoleLease, s.renewLease)
	route("DELETE /v1/leases/{id}", RoleLease, s.releaseLease)
	route("POST /v1/leases/{id}/runs", RoleLease, s.startRun)
	route("GET /v1/leases/{id}/output", RoleLease, s.output)
	route("GET /v1/pools", RoleLease, s.listPools)
	route("PATCH /v1/pools/{name}", RoleAdmin, s.scalePool)
	route("GET /v1/pools/{name}/cache/snapshots", RoleAdmin, s.cacheSnapshots)
	route("POST /v1/pools/{name}/cache/snapshots", RoleAdmin, s.snapshotCache)
	route("DELETE /v1/pools/{name}/cache/snapshots", RoleAdmin, s.dropCache)
	route("PUT /v1/pools/{name}/image", RoleAdmin, s.useImage)
	route("GET /v1/instances", RoleLease, s.listInstances)
	route("POST /v1/instances/{id}/drain", RoleAdmin, s.drain)
	route("GET /v1/instances/{id}/console", RoleAdmin, s.console)
	route("GET /v1/events", RoleLease, s.listEvents)
	route("/v1/", RoleLease, func(r *http.Request, _ pool.Caller) (int, any, error) {
		return 0, nil, apiError(http.StatusNotFound, "not_found", "no API endpoint %s %s", r.Method, r.URL.Path)
	})
	if s.Gatherer != nil {
		metrics := promhttp.HandlerFor(s.Gatherer, promhttp.HandlerOpts{})
		if !s.MetricsPublic {
			public := metrics
			metrics = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if _, err := auth.check(r, RoleLease); err != nil {
					// Any role will do; a refusal reads as the API's own.
					var e *Error
					if !errors.As(err, &e) {
						e = apiError(http.StatusUnauthorized, "unauthorized", "invalid bearer token")
					}
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(e.Status)
					// An *Error always encodes; a failed write is a client gone.
					_ = json.NewEncoder(w).Encode(e)
					return
				}
				public.ServeHTTP(w, r)
			})
		}
		mux.Handle("GET /metrics", metrics)
	}
	mux.Handle("GET /ui/", uiHandler())
	mux.Handle("GET /ui", http.RedirectHandler("/ui/", http.StatusMovedPermanently))
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /v1/openapi.yaml", serveOpenAPI) // public: it is documentation
	return mux
}

// BuildInfo says which build of Hangar serves.
type BuildInfo struct {
	Version   string `json:"version"`
	Commit    string `json:"commit"`
	GoVersion string `json:"go_version"`
}

// healthz answers "ok", or with ?verbose a JSON object with the build.
// It takes no token: load balancers and probes call it.
func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	if !r.URL.Query().Has("verbose") {
		_, _ = io.WriteString(w, "ok\n") // a failed write is a client gone
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(struct {
		Status string    `json:"status"`
		Build  BuildInfo `json:"build"`
	}{"ok", s.Build})
}

type auth struct {
	open   bool
	tokens map[[32]byte]Token
}

func newAuth(tokens []Token) *auth {
	a := &auth{open: len(tokens) == 0, tokens: map[[32]byte]Token{}}
	for _, t := range tokens {
		a.tokens[sha256.Sum256([]byte(t.Secret))] = t
	}
	return a
}

// check returns who the caller is, or an error for 401 or 403.
func (a *auth) check(r *http.Request, role string) (pool.Caller, error) {
	if a.open {
		return pool.Admin, nil
	}
	secret, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || secret == "" {
		return pool.Caller{}, apiError(http.StatusUnauthorized, "unauthorized", "missing bearer token")
	}
	// Look up by hash, then compare in constant time, so neither the map
	// nor the comparison leaks how much of a guess was right.
	sum := sha256.Sum256([]byte(secret))
	t, ok := a.tokens[sum]
	if !ok || subtle.ConstantTimeCompare([]byte(t.Secret), []byte(secret)) != 1 {
		return pool.Caller{}, apiError(http.StatusUnauthorized, "unauthorized", "invalid bearer token")
	}
	c := pool.Caller{Name: t.Name, Admin: t.Role == RoleAdmin}
	if role == RoleAdmin && !c.Admin {
		return c, apiError(http.StatusForbidden, "forbidden", "token %q has role %s; this needs %s", t.Name, t.Role, RoleAdmin)
	}
	return c, nil
}

// handlerFunc is an API handler: it gets the request and who made it.
type handlerFunc func(r *http.Request, c pool.Caller) (int, any, error)

func (s *Server) wrap(a *auth, role string, h handlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		who, err := a.check(r, role)
		status, v := 0, any(nil)
		if err == nil {
			status, v, err = h(r, who)
		}
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				e = mapError(err)
			}
			status, v = e.Status, e
			if status >= 500 {
				s.Log.Error("api request failed", "method", r.Method, "path", r.URL.Path, "err", err)
			}
		}
		s.Log.Debug("api request", "method", r.Method, "path", r.URL.Path, "caller", who.Name, "status", status, "duration", time.Since(start))
		if status == http.StatusNoContent {
			w.WriteHeader(status)
			return
		}
		if raw, ok := v.(rawBody); ok {
			raw.write(w, status)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(v); err != nil {
			s.Log.Warn("api answer not written", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
		}
	})
}

func mapError(err error) *Error {
	switch {
	case errors.Is(err, pool.ErrUnknownPool), errors.Is(err, pool.ErrUnknownLease), errors.Is(err, pool.ErrUnknownInstance):
		return &Error{Status: http.StatusNotFound, Code: "not_found", Message: err.Error()}
	case errors.Is(err, pool.ErrInvalid):
		return &Error{Status: http.StatusBadRequest, Code: "bad_request", Message: err.Error()}
	case errors.Is(err, pool.ErrLeaseEnded), errors.Is(err, pool.ErrLeaseBusy), errors.Is(err, pool.ErrNoCache):
		return &Error{Status: http.StatusConflict, Code: "conflict", Message: err.Error()}
	default:
		return &Error{Status: http.StatusInternalServerError, Code: "internal", Message: "internal error: " + err.Error()}
	}
}

// maxBody bounds request bodies: a lease request is a few hundred bytes.
// maxCommandBody bounds those that may carry a command (pool.MaxCommand,
// with room for JSON's escapes).
const (
	maxBody        = 64 << 10
	maxCommandBody = 2 << 20
)

func decode(r *http.Request, v any) error { return decodeLimit(r, v, maxBody) }

func decodeLimit(r *http.Request, v any, limit int64) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return apiError(http.StatusBadRequest, "bad_request", "bad request body: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	if dec.More() {
		return apiError(http.StatusBadRequest, "bad_request", "bad request body: more than one JSON value")
	}
	return nil
}

func duration(field, s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, apiError(http.StatusBadRequest, "bad_request", "%s: %q is not a duration such as 60s or 1h", field, s)
	}
	return d, nil
}

// LeaseRequest is the body of POST /v1/leases.
type LeaseRequest struct {
	Pool        string            `json:"pool"`
	Wait        string            `json:"wait,omitempty"`
	TTL         string            `json:"ttl,omitempty"`
	Worker      pool.Worker       `json:"worker"`
	Labels      map[string]string `json:"labels,omitempty"`
	ClientToken string            `json:"client_token,omitempty"`
	// Command (argv) is run on the instance in place of the pool's worker;
	// read its output with GET /v1/leases/{id}/output.
	Command []string `json:"command,omitempty"`
}

func (s *Server) createLease(r *http.Request, c pool.Caller) (int, any, error) {
	var req LeaseRequest
	if err := decodeLimit(r, &req, maxCommandBody); err != nil {
		return 0, nil, err
	}
	if req.Pool == "" {
		return 0, nil, apiError(http.StatusBadRequest, "bad_request", "pool is required")
	}
	wait, err := duration("wait", req.Wait)
	if err != nil {
		return 0, nil, err
	}
	ttl, err := duration("ttl", req.TTL)
	if err != nil {
		return 0, nil, err
	}
	v, err := s.Manager.Lease(r.Context(), c, pool.LeaseRequest{Pool: req.Pool, Wait: wait, TTL: ttl, Worker: req.Worker, Labels: req.Labels, ClientToken: req.ClientToken, Command: req.Command})
	if err != nil {
		return 0, nil, err
	}
	return leaseStatus(v), v, nil
}

// leaseStatus: 201 fulfilled, 202 still pending, 200 for an ended lease
// returned again for its client token.
func leaseStatus(v pool.LeaseView) int {
	switch v.State {
	case pool.LeaseActive:
		return http.StatusCreated
	case pool.LeasePending:
		return http.StatusAccepted
	default:
		return http.StatusOK
	}
}

func (s *Server) getLease(r *http.Request, c pool.Caller) (int, any, error) {
	wait, err := duration("wait", r.URL.Query().Get("wait"))
	if err != nil {
		return 0, nil, err
	}
	v, err := s.Manager.GetLease(r.Context(), c, r.PathValue("id"), wait)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, v, nil
}

// listLeases answers GET /v1/leases?pool=&state=: the caller's leases (an
// admin's: all), without passwords.
func (s *Server) listLeases(r *http.Request, c pool.Caller) (int, any, error) {
	q := r.URL.Query()
	v, err := s.Manager.Leases(c, q.Get("pool"), pool.LeaseState(q.Get("state")))
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, map[string]any{"leases": v}, nil
}

func (s *Server) renewLease(r *http.Request, c pool.Caller) (int, any, error) {
	v, err := s.Manager.Renew(r.Context(), c, r.PathValue("id"))
	return http.StatusOK, v, err
}

func (s *Server) releaseLease(r *http.Request, c pool.Caller) (int, any, error) {
	discard := false
	if q := r.URL.Query().Get("discard"); q != "" {
		b, err := strconv.ParseBool(q)
		if err != nil {
			return 0, nil, apiError(http.StatusBadRequest, "bad_request", "discard: %q is not true or false", q)
		}
		discard = b
	}
	return http.StatusNoContent, nil, s.Manager.Release(r.Context(), c, r.PathValue("id"), discard)
}

func (s *Server) listPools(r *http.Request, c pool.Caller) (int, any, error) {
	return http.StatusOK, map[string]any{"pools": s.Manager.Pools()}, nil
}

// ScaleRequest is the body of PATCH /v1/pools/{name}: new limits, kept
// across restarts over the config's, or reset to drop them.
type ScaleRequest struct {
	MinIdle      *int `json:"min_idle,omitempty"`
	MaxInstances *int `json:"max_instances,omitempty"`
	Reset        bool `json:"reset,omitempty"`
}

func (s *Server) scalePool(r *http.Request, c pool.Caller) (int, any, error) {
	var req ScaleRequest
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	given := req.MinIdle != nil || req.MaxInstances != nil
	switch {
	case req.Reset && given:
		return 0, nil, apiError(http.StatusBadRequest, "bad_request", "reset goes back to the config's limits; give it without min_idle and max_instances")
	case req.Reset:
		v, err := s.Manager.ResetScale(r.Context(), r.PathValue("name"))
		return http.StatusOK, v, err
	case !given:
		return 0, nil, apiError(http.StatusBadRequest, "bad_request", "give min_idle, max_instances or both, or reset")
	}
	v, err := s.Manager.Scale(r.Context(), r.PathValue("name"), req.MinIdle, req.MaxInstances)
	return http.StatusOK, v, err
}

func (s *Server) cacheSnapshots(r *http.Request, _ pool.Caller) (int, any, error) {
	v, err := s.Manager.CacheSnapshots(r.Context(), r.PathValue("name"))
	return http.StatusOK, map[string]any{"snapshots": v}, err
}

func (s *Server) snapshotCache(r *http.Request, _ pool.Caller) (int, any, error) {
	v, err := s.Manager.SnapshotCache(r.Context(), r.PathValue("name"))
	return http.StatusCreated, v, err
}

func (s *Server) dropCache(r *http.Request, _ pool.Caller) (int, any, error) {
	v, err := s.Manager.DropCache(r.Context(), r.PathValue("name"))
	return http.StatusOK, map[string]any{"deleted": v}, err
}

// ImageRequest is the body of PUT /v1/pools/{name}/image.
type ImageRequest struct {
	Image string `json:"image"`
	// Roll ends idle instances launched from another image at once.
	Roll bool `json:"roll,omitempty"`
}

// ImageAnswer says what PUT /v1/pools/{name}/image did.
type ImageAnswer struct {
	Image  string `json:"image"`
	Rolled int    `json:"rolled"`
}

func (s *Server) useImage(r *http.Request, _ pool.Caller) (int, any, error) {
	var req ImageRequest
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	if req.Image == "" {
		return 0, nil, apiError(http.StatusBadRequest, "bad_request", "give the image")
	}
	n, err := s.Manager.UseImage(r.Context(), r.PathValue("name"), req.Image, req.Roll)
	return http.StatusOK, ImageAnswer{Image: req.Image, Rolled: n}, err
}

func (s *Server) listInstances(r *http.Request, c pool.Caller) (int, any, error) {
	v, err := s.Manager.Instances(c, r.URL.Query().Get("pool"))
	if v == nil {
		v = []pool.InstanceView{}
	}
	return http.StatusOK, map[string]any{"instances": v}, err
}

// listEvents answers GET /v1/events?pool=: the last pool events, oldest
// first. A lease token sees them all, as it sees every instance in GET
// /v1/instances: they name pools and instances, never a lease or a secret.
func (s *Server) listEvents(r *http.Request, _ pool.Caller) (int, any, error) {
	v, err := s.Manager.Events(r.URL.Query().Get("pool"))
	return http.StatusOK, map[string]any{"events": v}, err
}

func (s *Server) drain(r *http.Request, c pool.Caller) (int, any, error) {
	v, err := s.Manager.Drain(r.Context(), r.PathValue("id"))
	return http.StatusOK, v, err
}

func (s *Server) console(r *http.Request, c pool.Caller) (int, any, error) {
	out, err := s.Manager.Console(r.Context(), r.PathValue("id"))
	return http.StatusOK, map[string]string{"id": r.PathValue("id"), "output": string(out)}, err
}

// RunRequest is the body of POST /v1/leases/{id}/runs.
type RunRequest struct {
	Command []string `json:"command"`
}

func (s *Server) startRun(r *http.Request, c pool.Caller) (int, any, error) {
	var req RunRequest
	if err := decodeLimit(r, &req, maxCommandBody); err != nil {
		return 0, nil, err
	}
	v, err := s.Manager.StartRun(r.Context(), c, r.PathValue("id"), req.Command)
	return http.StatusCreated, v, err
}

// Headers of GET /v1/leases/{id}/output, whose body is the output itself.
const (
	HeaderRun      = "Hangar-Run"           // the run the output is of
	HeaderOffset   = "Hangar-Output-Offset" // where the body starts in the output
	HeaderNext     = "Hangar-Output-Next"   // the offset to ask for next
	HeaderSkipped  = "Hangar-Output-Skipped"
	HeaderEpoch    = "Hangar-Output-Epoch"
	HeaderReset    = "Hangar-Output-Reset"
	HeaderRunState = "Hangar-Run-State"
	HeaderExitCode = "Hangar-Exit-Code" // only once the body reaches the end of a run that has exited
)

// rawBody is a handler's answer that is not JSON.
type rawBody interface {
	write(w http.ResponseWriter, status int)
}

type outputBody pool.RunOutput

func (o outputBody) write(w http.ResponseWriter, status int) {
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Cache-Control", "no-store")
	h.Set(HeaderRun, strconv.Itoa(o.Run))
	h.Set(HeaderOffset, strconv.FormatInt(o.Offset, 10))
	h.Set(HeaderNext, strconv.FormatInt(o.Next, 10))
	h.Set(HeaderEpoch, o.Epoch)
	h.Set(HeaderRunState, string(o.State))
	if o.Skipped > 0 {
		h.Set(HeaderSkipped, strconv.FormatInt(o.Skipped, 10))
	}
	if o.Reset {
		h.Set(HeaderReset, "true")
	}
	if o.Done {
		h.Set(HeaderExitCode, strconv.Itoa(o.ExitCode))
	}
	h.Set("Content-Length", strconv.Itoa(len(o.Data)))
	w.WriteHeader(status)
	_, _ = w.Write(o.Data) // a failed write is a client gone
}

// output answers with the run's output from offset (long-polling up to
// wait for some) as the body, and where it stands in headers.
func (s *Server) output(r *http.Request, c pool.Caller) (int, any, error) {
	q := r.URL.Query()
	wait, err := duration("wait", q.Get("wait"))
	if err != nil {
		return 0, nil, err
	}
	var offset int64
	if v := q.Get("offset"); v != "" {
		if offset, err = strconv.ParseInt(v, 10, 64); err != nil || offset < 0 {
			return 0, nil, apiError(http.StatusBadRequest, "bad_request", "offset: %q is not a byte offset", v)
		}
	}
	run := 0
	if v := q.Get("run"); v != "" {
		if run, err = strconv.Atoi(v); err != nil || run < 1 {
			return 0, nil, apiError(http.StatusBadRequest, "bad_request", "run: %q is not a run number", v)
		}
	}
	out, err := s.Manager.Output(r.Context(), c, r.PathValue("id"), run, offset, q.Get("epoch"), wait)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, outputBody(out), nil
}
