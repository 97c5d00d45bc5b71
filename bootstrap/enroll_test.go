package bootstrap

import (
	"bytes"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
)

// syncBuffer is a log destination the handler's goroutines share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type answer struct {
	status int
	header http.Header
	body   string
}

func call(t *testing.T, srv *httptest.Server, method, path, token, form string) answer {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+path, strings.NewReader(form))
	if err != nil {
		t.Fatal(err)
	}
	if form != "" {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return answer{resp.StatusCode, resp.Header, string(b)}
}

func enrollForm(id, key string, extra ...string) string {
	v := url.Values{"instance_id": {id}, "enroll_key": {key}}
	for i := 0; i+1 < len(extra); i += 2 {
		v.Set(extra[i], extra[i+1])
	}
	return v.Encode()
}

// TestEnrollHandler: the enroll route checks its fields, maps the backend's
// answers to 200 (one quoted shell assignment, not cached), 503 with
// Retry-After, a 401 that says nothing of why, and a 500; no token is ever
// in the log or an answer other than the one that issues it.
func TestEnrollHandler(t *testing.T) {
	key := strings.Repeat("0a", 32)
	doc := `{"instanceId":"` + idEnrolls + `","region":"local"}`
	for _, c := range []struct {
		name, token, form string
		status            int
		body              string // the whole body, for 200 and 401; a part otherwise
		retryAfter        string
		enrolled          *Enrollment // what the backend got, if it was asked
		log               string
	}{
		{name: "enrolls", token: "batch-token", form: enrollForm(idEnrolls, key),
			status: 200, body: `HANGAR_BOOTSTRAP_TOKEN='issued'\''token'` + "\n",
			enrolled: &Enrollment{InstanceID: idEnrolls, EnrollKey: key}, log: "instance enrolled"},
		{name: "upper-case key", token: "batch-token", form: enrollForm(idEnrolls, strings.ToUpper(key)),
			status: 200, body: `HANGAR_BOOTSTRAP_TOKEN='issued'\''token'` + "\n",
			enrolled: &Enrollment{InstanceID: idEnrolls, EnrollKey: key}},
		{name: "signed", token: "batch-token", form: enrollForm(idEnrolls, key, "document", doc, "signature", "c2ln\n"),
			status: 200, body: `HANGAR_BOOTSTRAP_TOKEN='issued'\''token'` + "\n",
			enrolled: &Enrollment{InstanceID: idEnrolls, EnrollKey: key, Document: []byte(doc), Signature: []byte("c2ln\n")}},
		{name: "pending", token: "batch-token", form: enrollForm(idPending, key),
			status: 503, body: "ask again", retryAfter: "2", enrolled: &Enrollment{InstanceID: idPending, EnrollKey: key}},
		{name: "refused", token: "batch-token", form: enrollForm(idRefused, key),
			status: 401, body: enrollRefused + "\n", enrolled: &Enrollment{InstanceID: idRefused, EnrollKey: key}},
		{name: "backend fails", token: "batch-token", form: enrollForm(idBroken, key),
			status: 500, body: "enrollment failed", enrolled: &Enrollment{InstanceID: idBroken, EnrollKey: key}, log: "store is down"},
		{name: "no token", form: enrollForm(idEnrolls, key), status: 401, body: enrollRefused + "\n", log: "no batch token"},
		{name: "unknown token", token: "bad-token", form: enrollForm(idEnrolls, key), status: 401, body: enrollRefused + "\n",
			log: "unknown or dead batch token"},
		// An instance's own token is no batch token.
		{name: "instance token", token: "good-token", form: enrollForm(idEnrolls, key), status: 401, body: enrollRefused + "\n"},
		{name: "id not EC2's", token: "batch-token", form: enrollForm("i-xyz00000", key), status: 400, body: "instance_id must be"},
		{name: "id too short", token: "batch-token", form: enrollForm("i-0123456", key), status: 400, body: "instance_id must be"},
		{name: "id too long", token: "batch-token", form: enrollForm("i-0123456789abcdef01", key), status: 400, body: "instance_id must be"},
		{name: "id with a line", token: "batch-token", form: enrollForm(idEnrolls+"\n", key), status: 400, body: "instance_id must be"},
		{name: "no id", token: "batch-token", form: "enroll_key=" + key, status: 400, body: "instance_id must be"},
		{name: "short key", token: "batch-token", form: enrollForm(idEnrolls, key[:62]), status: 400, body: "enroll_key must be"},
		{name: "key not hex", token: "batch-token", form: enrollForm(idEnrolls, strings.Repeat("zz", 32)), status: 400, body: "enroll_key must be"},
		{name: "document alone", token: "batch-token", form: enrollForm(idEnrolls, key, "document", doc), status: 400, body: "go together"},
		{name: "signature alone", token: "batch-token", form: enrollForm(idEnrolls, key, "signature", "c2ln"), status: 400, body: "go together"},
		{name: "over 16 KiB", token: "batch-token", form: enrollForm(idEnrolls, key, "document", strings.Repeat("x", 16<<10), "signature", "c2ln"),
			status: 400, body: "too large"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeBackend{}
			var logs syncBuffer
			srv := httptest.NewServer(Handler(f, slog.New(slog.NewTextHandler(&logs, nil))))
			defer srv.Close()
			a := call(t, srv, "POST", "/bootstrap/v1/enroll", c.token, c.form)
			if a.status != c.status {
				t.Errorf("status %d %q, want %d", a.status, a.body, c.status)
			}
			if c.status == 200 || c.status == 401 {
				if a.body != c.body {
					t.Errorf("body %q, want %q", a.body, c.body)
				}
			} else if !strings.Contains(a.body, c.body) {
				t.Errorf("body %q, want it to contain %q", a.body, c.body)
			}
			if got := a.header.Get("Retry-After"); got != c.retryAfter {
				t.Errorf("Retry-After %q, want %q", got, c.retryAfter)
			}
			if c.status == 200 {
				if cc, ct := a.header.Get("Cache-Control"), a.header.Get("Content-Type"); cc != "no-store" || !strings.HasPrefix(ct, "text/plain") {
					t.Errorf("Cache-Control %q, Content-Type %q; want no-store, text/plain", cc, ct)
				}
			}
			f.mu.Lock()
			enrolls := f.enrolls
			f.mu.Unlock()
			switch {
			case c.enrolled == nil && len(enrolls) > 0:
				t.Errorf("the backend was asked to enroll %+v", enrolls)
			case c.enrolled != nil && len(enrolls) != 1:
				t.Errorf("the backend was asked to enroll %d times, want once", len(enrolls))
			case c.enrolled != nil:
				got := enrolls[0]
				if got.RemoteAddr == "" {
					t.Errorf("the enrollment has no remote address")
				}
				got.RemoteAddr = ""
				if got.InstanceID != c.enrolled.InstanceID || got.EnrollKey != c.enrolled.EnrollKey ||
					!bytes.Equal(got.Document, c.enrolled.Document) || !bytes.Equal(got.Signature, c.enrolled.Signature) {
					t.Errorf("enrolled %+v, want %+v", got, *c.enrolled)
				}
			}
			log := logs.String()
			if !strings.Contains(log, c.log) {
				t.Errorf("log %q does not say %q", log, c.log)
			}
			for _, secret := range []string{"batch-token", "issued", HashToken("batch-token"), "good-token"} {
				if strings.Contains(log, secret) {
					t.Errorf("log shows %q:\n%s", secret, log)
				}
				if c.status != 200 && strings.Contains(a.body, secret) {
					t.Errorf("answer shows %q: %q", secret, a.body)
				}
			}
		})
	}
}

// TestScriptTakesBatchToken: an instance that has not enrolled fetches its
// pool's script with the batch token, and with nothing else the batch token
// opens.
func TestScriptTakesBatchToken(t *testing.T) {
	f := &fakeBackend{}
	var logs syncBuffer
	srv := httptest.NewServer(Handler(f, slog.New(slog.NewTextHandler(&logs, nil))))
	defer srv.Close()
	if a := call(t, srv, "GET", "/bootstrap/v1/script", "batch-token", ""); a.status != 200 || a.body != "#!/bin/bash\necho script of p1\n" {
		t.Errorf("script with the batch token: %d %q; want 200 and p1's script", a.status, a.body)
	}
	if a := call(t, srv, "GET", "/bootstrap/v1/script", "good-token", ""); a.status != 200 || a.body != "#!/bin/bash\necho hi\n" {
		t.Errorf("script with the instance's token: %d %q; want 200 and its script", a.status, a.body)
	}
	if a := call(t, srv, "GET", "/bootstrap/v1/script", "bad-token", ""); a.status != 401 {
		t.Errorf("script with an unknown token: %d %q; want 401", a.status, a.body)
	}
	if strings.Contains(logs.String(), "batch-token") {
		t.Errorf("log shows the batch token:\n%s", logs.String())
	}
}

// TestScriptBatchTokenNeedsPoolScripter: a backend that cannot serve a pool's
// script by name refuses batch tokens there.
func TestScriptBatchTokenNeedsPoolScripter(t *testing.T) {
	srv := httptest.NewServer(Handler(noPoolScript{&fakeBackend{}}, slog.New(slog.DiscardHandler)))
	defer srv.Close()
	if a := call(t, srv, "GET", "/bootstrap/v1/script", "batch-token", ""); a.status != 401 {
		t.Errorf("script with the batch token: %d %q; want 401", a.status, a.body)
	}
}

// noPoolScript hides the fake's PoolScript.
type noPoolScript struct{ Backend }

// TestReadyRefusesBatchToken: every route but script and enroll refuses a
// batch token as an unknown one, and asks the backend nothing.
func TestReadyRefusesBatchToken(t *testing.T) {
	f := &fakeBackend{}
	srv := httptest.NewServer(Handler(f, slog.New(slog.DiscardHandler)))
	defer srv.Close()
	for _, c := range []struct{ method, path, form string }{
		{"POST", "/bootstrap/v1/ready", "hostname=h1"},
		{"GET", "/bootstrap/v1/assignment?wait=0s", ""},
		{"POST", "/bootstrap/v1/heartbeat", "worker=none"},
		{"PUT", "/bootstrap/v1/output?lease=l-1&run=1", "out"},
		{"POST", "/bootstrap/v1/exit", "lease=l-1&run=1&exit_code=0"},
	} {
		if a := call(t, srv, c.method, c.path, "batch-token", c.form); a.status != 401 {
			t.Errorf("%s %s with the batch token: %d %q; want 401", c.method, c.path, a.status, a.body)
		}
	}
	if len(f.ready) != 0 || len(f.hb) != 0 || f.outputString() != "" || f.exited {
		t.Errorf("the backend acted on a batch token: ready %v, heartbeats %v, output %q, exited %v", f.ready, f.hb, f.outputString(), f.exited)
	}
}
