package bootstrap

import (
	"errors"
	"io"
	"net/http"
	"regexp"
	"strings"

	"github.com/hangar-ci/hangar/internal/shell"
)

// EnrollRetryAfter is what a pending enrollment's Retry-After says, in
// seconds: a launch answers within seconds, and an instance that boots
// before its launch has answered asks again that soon.
const EnrollRetryAfter = "2"

var (
	instanceIDRE = regexp.MustCompile(`^i-[0-9a-f]{8,17}$`)
	enrollKeyRE  = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// enrollRefused is the body of every 401 of the enroll route: the instance
// learns nothing of why (a batch token read from user-data by a build must
// not become an oracle); the log says why.
const enrollRefused = "enrollment refused"

// enroll gives an instance of a batched launch its own bootstrap token in
// exchange for the batch token and its instance id (POST
// /bootstrap/v1/enroll, form: instance_id, enroll_key, and document and
// signature with signed identity). The answer is one shell assignment,
// HANGAR_BOOTSTRAP_TOKEN='…', which the bootstrap sources.
func (h *handler) enroll(w http.ResponseWriter, r *http.Request) {
	remote := r.RemoteAddr
	// Refusals of the token itself; the backend logs its own. Never the
	// token: where the call came from is what finds the culprit.
	refuse := func(why string, err error) {
		h.log.Warn("enrollment refused", "remote", remote, "reason", why, "err", err)
		http.Error(w, enrollRefused, http.StatusUnauthorized)
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || token == "" {
		refuse("no batch token", nil)
		return
	}
	hash := HashToken(token)
	pool, err := h.b.AuthenticateBatch(hash)
	if err != nil {
		refuse("unknown or dead batch token", err)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxForm)
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad enrollment: "+err.Error(), http.StatusBadRequest)
		return
	}
	e, err := parseEnrollment(r.PostForm.Get)
	if err != nil {
		h.log.Warn("bad enrollment", "pool", pool, "remote", remote, "err", err)
		http.Error(w, "bad enrollment: "+err.Error(), http.StatusBadRequest)
		return
	}
	e.RemoteAddr = remote
	issued, err := h.b.Enroll(r.Context(), hash, e)
	switch {
	case errors.Is(err, ErrEnrollPending):
		w.Header().Set("Retry-After", EnrollRetryAfter)
		http.Error(w, "the launch of this instance has not answered yet; ask again", http.StatusServiceUnavailable)
		return
	case errors.Is(err, ErrUnauthorized):
		// The backend has logged it, with why.
		http.Error(w, enrollRefused, http.StatusUnauthorized)
		return
	case err != nil:
		h.log.Error("enrollment failed", "pool", pool, "instance_id", e.InstanceID, "remote", remote, "err", err)
		http.Error(w, "enrollment failed", http.StatusInternalServerError)
		return
	}
	h.log.Info("instance enrolled", "pool", pool, "instance_id", e.InstanceID, "remote", remote)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = io.WriteString(w, "HANGAR_BOOTSTRAP_TOKEN="+shell.Quote(issued)+"\n")
}

// parseEnrollment reads and checks an enrollment's fields. Its errors name
// the field and never repeat a value that was not valid.
func parseEnrollment(v func(string) string) (Enrollment, error) {
	e := Enrollment{InstanceID: v("instance_id"), EnrollKey: strings.ToLower(v("enroll_key"))}
	var errs []error
	if !instanceIDRE.MatchString(e.InstanceID) {
		errs = append(errs, errors.New("instance_id must be an EC2 instance id (i- and 8 to 17 hex digits)"))
	}
	if !enrollKeyRE.MatchString(e.EnrollKey) {
		errs = append(errs, errors.New("enroll_key must be 64 hex digits"))
	}
	doc, sig := v("document"), v("signature")
	if (doc == "") != (sig == "") {
		errs = append(errs, errors.New("document and signature go together"))
	}
	if doc != "" {
		e.Document, e.Signature = []byte(doc), []byte(sig)
	}
	return e, errors.Join(errs...)
}
