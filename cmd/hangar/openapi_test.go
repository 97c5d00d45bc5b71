package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
	"github.com/prometheus/client_golang/prometheus"
)

// The API's OpenAPI document, pool/api/openapi.yaml, is its contract. These
// tests hold it against the routes the server registers, and against real
// requests and answers of a real server on the local cloud.

// openAPIDoc loads the document the server embeds and checks it is valid.
func openAPIDoc(t *testing.T) *openapi3.T {
	t.Helper()
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(api.OpenAPI())
	if err != nil {
		t.Fatalf("loading pool/api/openapi.yaml: %v", err)
	}
	if err := doc.Validate(loader.Context, openapi3.EnableMultiError()); err != nil {
		t.Fatalf("pool/api/openapi.yaml is not a valid OpenAPI document: %v", err)
	}
	return doc
}

// operations lists the document's operations by "METHOD /path", the form
// of an http.ServeMux pattern.
func operations(doc *openapi3.T) map[string]*openapi3.Operation {
	ops := map[string]*openapi3.Operation{}
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			ops[method+" "+path] = op
		}
	}
	return ops
}

// The document describes exactly the routes the server registers: a /v1
// route added without its description, or a description left of a route
// gone, fails.
func TestOpenAPIRoutes(t *testing.T) {
	ops := operations(openAPIDoc(t))
	served := map[string]bool{}
	for _, p := range (&api.Server{Gatherer: prometheus.NewRegistry()}).Routes() {
		_, path, ok := strings.Cut(p, " ")
		if !ok {
			// No method: a catch-all, such as "/v1/" for the not-found
			// answer, which no client calls on purpose.
			continue
		}
		served[p] = true
		if _, ok := ops[p]; !ok && strings.HasPrefix(path, "/v1/") {
			t.Errorf("the server serves %s, which pool/api/openapi.yaml does not describe", p)
		}
	}
	if len(served) < 10 {
		t.Fatalf("the server lists only %d routes: %v", len(served), served)
	}
	for op := range ops {
		if !served[op] {
			t.Errorf("pool/api/openapi.yaml describes %s, which the server does not serve", op)
		}
	}
}

// contract is an http.RoundTripper that holds every request it carries,
// and the server's answer to it, against the OpenAPI document, failing the
// test on any mismatch. It notes which operations answered what.
type contract struct {
	t      *testing.T
	doc    *openapi3.T
	router routers.Router
	// open: the server has no tokens, and needs none.
	open bool

	mu       sync.Mutex
	answered map[string]map[int]bool // "METHOD /path" of the document → statuses
}

func newContract(t *testing.T) *contract {
	doc := openAPIDoc(t)
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatalf("routing pool/api/openapi.yaml: %v", err)
	}
	return &contract{t: t, doc: doc, router: router, answered: map[string]map[int]bool{}}
}

// breaksContractKey marks a request the document must refuse.
type breaksContractKey struct{}

// breaking marks the requests made with ctx as ones the document must
// refuse: the bad input a test sends on purpose.
func breaking(ctx context.Context) context.Context {
	return context.WithValue(ctx, breaksContractKey{}, true)
}

// client is an API client whose every call goes through the check.
func (c *contract) client(base, token string) *api.Client {
	return &api.Client{BaseURL: base, Token: token, HTTP: &http.Client{Transport: c}}
}

// RoundTrip checks the request, sends it, and checks the answer.
func (c *contract) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	what := req.Method + " " + req.URL.RequestURI()
	var body []byte
	if req.Body != nil {
		var err error
		if body, err = io.ReadAll(req.Body); err != nil {
			return nil, err
		}
		_ = req.Body.Close()
	}
	copyOf := func() *http.Request {
		r := req.Clone(ctx)
		r.Body, r.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
		if len(body) == 0 {
			r.Body = http.NoBody
		}
		return r
	}

	route, params, err := c.router.FindRoute(copyOf())
	if err != nil {
		c.t.Errorf("%s: no operation of pool/api/openapi.yaml: %v", what, err)
		return nil, fmt.Errorf("%s is not in the OpenAPI document: %w", what, err)
	}
	in := &openapi3filter.RequestValidationInput{Request: copyOf(), PathParams: params, Route: route, Options: &openapi3filter.Options{
		MultiError:          true,
		SkipSettingDefaults: true,
		AuthenticationFunc:  c.authenticate,
	}}
	reqErr := openapi3filter.ValidateRequest(ctx, in)
	switch breaks := ctx.Value(breaksContractKey{}) != nil; {
	case breaks && reqErr == nil:
		c.t.Errorf("%s %s: the document accepts this request, which a test sends as bad input", what, body)
	case !breaks && reqErr != nil:
		c.t.Errorf("%s %s: the request does not match the document: %v", what, body, reqErr)
	}

	resp, err := http.DefaultTransport.RoundTrip(copyOf())
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header,
		Options: &openapi3filter.Options{MultiError: true, IncludeResponseStatus: true}}
	out.SetBodyBytes(data)
	if err := openapi3filter.ValidateResponse(ctx, out); err != nil {
		c.t.Errorf("%s: the answer %d %s does not match the document: %v\n%s", what, resp.StatusCode, resp.Header.Get("Content-Type"), err, data)
	}
	c.mu.Lock()
	op := route.Method + " " + route.Path
	if c.answered[op] == nil {
		c.answered[op] = map[int]bool{}
	}
	c.answered[op][resp.StatusCode] = true
	c.mu.Unlock()
	return resp, nil
}

// authenticate is the document's bearer scheme as a client must follow it:
// a server with tokens needs "Authorization: Bearer TOKEN", an open one
// nothing.
func (c *contract) authenticate(_ context.Context, in *openapi3filter.AuthenticationInput) error {
	if in.SecuritySchemeName != "bearer" {
		return fmt.Errorf("unknown security scheme %s", in.SecuritySchemeName)
	}
	if c.open {
		return nil
	}
	if tok, ok := strings.CutPrefix(in.RequestValidationInput.Request.Header.Get("Authorization"), "Bearer "); !ok || tok == "" {
		return errors.New("no bearer token")
	}
	return nil
}

// call sends a request by hand (body as it is, JSON if any) and returns the
// answer's status, the API error if any, and the body.
func (c *contract) call(ctx context.Context, base, token, method, path, body string) (int, api.Error, []byte) {
	c.t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, base+path, strings.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := (&http.Client{Transport: c}).Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer func() { _ = resp.Body.Close() }()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatal(err)
	}
	var e api.Error
	if resp.StatusCode >= 400 {
		_ = json.Unmarshal(data, &e) // a body that is no API error leaves e empty
	}
	return resp.StatusCode, e, data
}

// covered fails unless every operation of the document answered with
// success at least once, and each error status was seen.
func (c *contract) covered(errorStatuses ...int) {
	c.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	seen := map[int]bool{}
	for op := range operations(c.doc) {
		ok := false
		for status := range c.answered[op] {
			seen[status] = true
			ok = ok || status < 300
		}
		if !ok {
			c.t.Errorf("%s never answered with success in this test (statuses %v)", op, slices.Sorted(maps.Keys(c.answered[op])))
		}
	}
	for _, s := range errorStatuses {
		if !seen[s] {
			c.t.Errorf("no operation answered %d in this test", s)
		}
	}
}

// wantStatus fails unless err is the API's error with status.
func wantStatus(t *testing.T, what string, err error, status int) {
	t.Helper()
	var e *api.Error
	if !errors.As(err, &e) || e.Status != status {
		t.Errorf("%s: %v, want an API error with status %d", what, err, status)
	}
}

// readOutput reads a run's output to its end through c.
func readOutput(t *testing.T, c *api.Client, lease string) (string, pool.RunOutput) {
	t.Helper()
	var out bytes.Buffer
	var last pool.RunOutput
	for epoch, offset := "", int64(0); !last.Done; offset, epoch = last.Next, last.Epoch {
		var err error
		if last, err = c.Output(t.Context(), lease, 0, offset, epoch, 30*time.Second); err != nil {
			t.Fatalf("output of %s: %v", lease, err)
		}
		out.Write(last.Data)
	}
	return out.String(), last
}

// Every operation of the document, on a real server in open mode, with
// its successes and its errors: each request and each answer matches the
// document, and bad input the server refuses is input the document
// refuses too (or, where it cannot say, a 400 it documents).
func TestOpenAPIContract(t *testing.T) {
	dir := t.TempDir()
	bake := filepath.Join(dir, "bake.sh")
	writeFile(t, bake, "true\n")
	ts := startTest(t, testTOML(filepath.Join(dir, "data"), "demo", cacheTOML+
		"[pools.plain]\nprovider = \"local\"\nworker_command = \"sleep 600\"\n[pools.plain.bake]\nscript = \""+bake+"\"\n"), nil)
	check := newContract(t)
	check.open = true
	c := check.client(ts.url, "")
	ctx := t.Context()
	bad := breaking(ctx)

	// The server: health, metrics and the document itself.
	if status, _, body := check.call(ctx, ts.url, "", "GET", "/healthz", ""); status != 200 || string(body) != "ok\n" {
		t.Errorf("GET /healthz: %d %q", status, body)
	}
	if status, _, body := check.call(ctx, ts.url, "", "GET", "/healthz?verbose", ""); status != 200 || !strings.Contains(string(body), `"status":"ok"`) {
		t.Errorf("GET /healthz?verbose: %d %q", status, body)
	}
	if status, _, body := check.call(ctx, ts.url, "", "GET", "/metrics", ""); status != 200 || !strings.Contains(string(body), "hangar_") {
		t.Errorf("GET /metrics: %d, %d bytes", status, len(body))
	}
	if status, _, body := check.call(ctx, ts.url, "", "GET", "/v1/openapi.yaml", ""); status != 200 || !bytes.Equal(body, api.OpenAPI()) {
		t.Errorf("GET /v1/openapi.yaml: %d, %d bytes; want the %d of pool/api/openapi.yaml", status, len(body), len(api.OpenAPI()))
	}

	// A lease with a command, its output, a second run, and the rest of a
	// lease's life.
	req := api.LeaseRequest{Pool: "demo", Wait: "60s", TTL: "10m", Labels: map[string]string{"job": "42"}, ClientToken: "job-42",
		Worker: pool.Worker{Name: "contract-1", Password: "pw-123", Master: "127.0.0.1:9989"}, Command: []string{"sh", "-c", "echo hello; exit 3"}}
	lease, err := c.Lease(ctx, req)
	if err != nil || lease.State != pool.LeaseActive || lease.Instance == nil {
		t.Fatalf("lease: %+v, %v", lease, err)
	}
	if again, err := c.Lease(ctx, req); err != nil || again.ID != lease.ID {
		t.Errorf("lease again with its client token: %+v, %v; want %s", again, err, lease.ID)
	}
	if out, last := readOutput(t, c, lease.ID); out != "hello\n" || last.ExitCode != 3 {
		t.Errorf("output %q, exit %d", out, last.ExitCode)
	}
	if _, err := c.GetLease(ctx, lease.ID, 0); err != nil {
		t.Error(err)
	}
	if list, err := c.Leases(ctx, "demo", pool.LeaseActive); err != nil || len(list) != 1 {
		t.Errorf("active leases: %+v, %v", list, err)
	}
	if _, err := c.Renew(ctx, lease.ID); err != nil {
		t.Error(err)
	}
	if _, err := c.StartRun(ctx, lease.ID, []string{"sleep", "600"}); err != nil {
		t.Fatal(err)
	}
	_, err = c.StartRun(ctx, lease.ID, []string{"true"})
	wantStatus(t, "a run while one runs", err, 409)
	instances, err := c.Instances(ctx, "")
	if err != nil || len(instances) == 0 {
		t.Fatalf("instances: %+v, %v", instances, err)
	}
	if _, err := c.Console(ctx, lease.Instance.ID); err != nil {
		t.Error(err)
	}
	if v, err := c.Drain(ctx, lease.Instance.ID); err != nil || v.State != pool.Draining {
		t.Errorf("drain: %+v, %v", v, err)
	}
	if err := c.Release(ctx, lease.ID, true); err != nil {
		t.Fatal(err)
	}
	_, err = c.Renew(ctx, lease.ID)
	wantStatus(t, "renewing an ended lease", err, 409)
	_, err = c.Output(ctx, lease.ID, 0, 0, "", 0)
	wantStatus(t, "the output of an ended lease", err, 409)
	if status, _, _ := check.call(ctx, ts.url, "", "POST", "/v1/leases", `{"pool":"demo","client_token":"job-42"}`); status != 200 {
		t.Errorf("the ended lease of a client token: %d, want 200", status)
	}

	// A pending lease of a paused pool.
	if _, err := c.Scale(ctx, "plain", api.ScaleRequest{MaxInstances: new(0)}); err != nil {
		t.Fatal(err)
	}
	if status, _, _ := check.call(ctx, ts.url, "", "POST", "/v1/leases", `{"pool":"plain","wait":"0s"}`); status != 202 {
		t.Errorf("a lease of a paused pool: %d, want 202", status)
	}
	pending, err := c.Leases(ctx, "plain", pool.LeasePending)
	if err != nil || len(pending) != 1 {
		t.Fatalf("pending leases: %+v, %v", pending, err)
	}
	_, err = c.StartRun(ctx, pending[0].ID, []string{"true"})
	wantStatus(t, "a run on a pending lease", err, 409)
	if err := c.Release(ctx, pending[0].ID, false); err != nil {
		t.Error(err)
	}
	if v, err := c.Scale(ctx, "plain", api.ScaleRequest{Reset: true}); err != nil || v.Scaled || v.MaxInstances == 0 || v.Config != nil {
		t.Errorf("scale reset: %+v, %v", v, err)
	}

	// The cache: an instance that served a lease and is idle is
	// snapshotted, listed and dropped.
	done, err := c.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s", Command: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	readOutput(t, c, done.ID)
	if err := c.Release(ctx, done.ID, false); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "an idle instance", 30*time.Second, func() bool {
		list, err := c.Instances(ctx, "demo")
		return err == nil && slices.ContainsFunc(list, func(in pool.InstanceView) bool { return in.State == pool.Idle })
	})
	snap, err := c.SnapshotCache(ctx, "demo")
	if err != nil {
		t.Fatal(err)
	}
	// The discarded instance of the first lease may have saved its cache
	// too: the new snapshot is one of them.
	if list, err := c.CacheSnapshots(ctx, "demo"); err != nil || !slices.ContainsFunc(list, func(s pool.CacheSnapshotView) bool { return s.ID == snap.ID }) {
		t.Errorf("snapshots: %+v, %v; want %s among them", list, err, snap.ID)
	}
	if gone, err := c.DropCache(ctx, "demo"); err != nil || !slices.Contains(gone, snap.ID) {
		t.Errorf("drop: %v, %v; want %s among them", gone, err, snap.ID)
	}
	_, err = c.DropCache(ctx, "plain")
	wantStatus(t, "dropping the cache of a pool without one", err, 409)

	// An image baked for plain (made here from an instance of demo): plain
	// launches from it.
	st, _ := cloud.StorageOf(ts.localProvider(t))
	img, err := st.CreateImage(ctx, done.Instance.ID, cloud.ImageSpec{Name: "contract-plain", Tags: map[string]string{pool.TagBake: "plain"}})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the image to be available", 30*time.Second, func() bool {
		imgs, err := st.Images(ctx, cloud.Filter{IDs: []string{img.ID}})
		return err == nil && len(imgs) == 1 && imgs[0].State == cloud.ImageAvailable
	})
	if v, err := c.UseImage(ctx, "plain", img.ID, true); err != nil || v.Image != img.ID {
		t.Errorf("use image: %+v, %v", v, err)
	}
	pools, err := c.Pools(ctx)
	if err != nil || len(pools) != 2 || pools[1].Image != img.ID {
		t.Errorf("pools: %+v, %v; want plain on %s", pools, err, img.ID)
	}

	if status, _, body := check.call(ctx, ts.url, "", "GET", "/v1/events?pool=demo", ""); status != 200 || !strings.Contains(string(body), `"kind": "state"`) {
		t.Errorf("GET /v1/events: %d %s", status, body)
	}

	// Bad input: what the document refuses too is sent as breaking it;
	// what it cannot tell is a 400 it documents all the same.
	cases := []struct {
		name, method, path, body string
		breaks                   bool
		status                   int
	}{
		{"no pool", "POST", "/v1/leases", `{}`, true, 400},
		{"unknown pool", "POST", "/v1/leases", `{"pool":"nope"}`, false, 404},
		{"not JSON", "POST", "/v1/leases", `pool=demo`, true, 400},
		{"unknown field", "POST", "/v1/leases", `{"pool":"demo","colour":"red"}`, true, 400},
		{"wrong type", "POST", "/v1/leases", `{"pool":7}`, true, 400},
		{"bad wait", "POST", "/v1/leases", `{"pool":"demo","wait":"soon"}`, true, 400},
		{"wait too long", "POST", "/v1/leases", `{"pool":"demo","wait":"16m"}`, false, 400},
		{"bad worker name", "POST", "/v1/leases", `{"pool":"demo","worker":{"name":"a b"}}`, true, 400},
		{"bad master", "POST", "/v1/leases", `{"pool":"demo","worker":{"master":"nohost"}}`, false, 400},
		{"bad label", "POST", "/v1/leases", `{"pool":"demo","labels":{"-x":"y"}}`, true, 400},
		{"bad state", "GET", "/v1/leases?state=done", ``, true, 400},
		{"leases of unknown pool", "GET", "/v1/leases?pool=nope", ``, false, 404},
		{"unknown lease", "GET", "/v1/leases/l-nope", ``, false, 404},
		{"bad get wait", "GET", "/v1/leases/" + done.ID + "?wait=x", ``, true, 400},
		{"renew unknown", "POST", "/v1/leases/l-nope/renew", ``, false, 404},
		{"release unknown", "DELETE", "/v1/leases/l-nope", ``, false, 404},
		{"bad discard", "DELETE", "/v1/leases/" + done.ID + "?discard=maybe", ``, true, 400},
		{"run without command", "POST", "/v1/leases/" + done.ID + "/runs", `{"command":[]}`, true, 400},
		{"run on unknown lease", "POST", "/v1/leases/l-nope/runs", `{"command":["true"]}`, false, 404},
		{"output of unknown lease", "GET", "/v1/leases/l-nope/output", ``, false, 404},
		{"bad offset", "GET", "/v1/leases/" + done.ID + "/output?offset=-1", ``, true, 400},
		{"bad run", "GET", "/v1/leases/" + done.ID + "/output?run=x", ``, true, 400},
		{"scale nothing", "PATCH", "/v1/pools/demo", `{}`, true, 400},
		{"scale negative", "PATCH", "/v1/pools/demo", `{"min_idle":-1}`, true, 400},
		{"scale below min", "PATCH", "/v1/pools/demo", `{"min_idle":5,"max_instances":2}`, false, 400},
		{"scale unknown field", "PATCH", "/v1/pools/demo", `{"max":3}`, true, 400},
		{"scale unknown pool", "PATCH", "/v1/pools/nope", `{"min_idle":1}`, false, 404},
		{"snapshots of unknown pool", "GET", "/v1/pools/nope/cache/snapshots", ``, false, 404},
		{"snapshot without cache", "POST", "/v1/pools/plain/cache/snapshots", ``, false, 409},
		{"no image", "PUT", "/v1/pools/plain/image", `{"roll":true}`, true, 400},
		{"not a baked image", "PUT", "/v1/pools/plain/image", `{"image":"ami-00000000000000000"}`, false, 400},
		{"image of unknown pool", "PUT", "/v1/pools/nope/image", `{"image":"` + img.ID + `"}`, false, 404},
		{"instances of unknown pool", "GET", "/v1/instances?pool=nope", ``, false, 404},
		{"drain unknown", "POST", "/v1/instances/i-0000000000000000f/drain", ``, false, 404},
		{"events of unknown pool", "GET", "/v1/events?pool=nope", ``, false, 404},
		{"console unknown", "GET", "/v1/instances/i-0000000000000000f/console", ``, false, 404},
	}
	for _, tc := range cases {
		cctx := ctx
		if tc.breaks {
			cctx = bad
		}
		if status, e, _ := check.call(cctx, ts.url, "", tc.method, tc.path, tc.body); status != tc.status || e.Message == "" {
			t.Errorf("%s: %s %s = %d %+v; want %d", tc.name, tc.method, tc.path, status, e, tc.status)
		}
	}
	check.covered(400, 404, 409)
}

// With tokens: every operation the document secures answers 401 without a
// token, every one it marks x-hangar-role: admin answers 403 to a lease
// token, and no other does; all as the document describes.
func TestOpenAPIContractTokens(t *testing.T) {
	const leaseTok, adminTok = "lease-secret-0123456789", "admin-secret-9876543210"
	ts := startTest(t, testTOML(t.TempDir(), "demo", "max_instances = 1\n")+`
[[server.tokens]]
name = "ci"
role = "lease"
token = "`+leaseTok+`"
[[server.tokens]]
name = "ops"
role = "admin"
token = "`+adminTok+`"
`, nil)
	check := newContract(t)
	ctx := t.Context()
	// Paused, so that the leases below stay pending and launch nothing.
	if _, err := check.client(ts.url, adminTok).Scale(ctx, "demo", api.ScaleRequest{MaxInstances: new(0)}); err != nil {
		t.Fatal(err)
	}
	// A valid body for each operation that takes one.
	bodies := map[string]string{
		"createLease": `{"pool":"demo","wait":"0s"}`,
		"startRun":    `{"command":["true"]}`,
		"scalePool":   `{"max_instances":0}`,
		"useImage":    `{"image":"ami-00000000000000000"}`,
	}
	params := strings.NewReplacer("{id}", "x-nope", "{name}", "demo")
	for op, o := range operations(check.doc) {
		method, path, _ := strings.Cut(op, " ")
		path = params.Replace(path)
		body := bodies[o.OperationID]
		if o.RequestBody != nil && body == "" {
			t.Errorf("%s takes a body: give this test one", op)
		}
		reqs := check.doc.Security
		if o.Security != nil {
			reqs = *o.Security
		}
		secured := len(reqs) > 0 && !slices.ContainsFunc(reqs, func(r openapi3.SecurityRequirement) bool { return len(r) == 0 })
		role := o.Extensions["x-hangar-role"]
		if secured && role != api.RoleLease && role != api.RoleAdmin {
			t.Errorf("%s: x-hangar-role is %v, want %s or %s", op, role, api.RoleLease, api.RoleAdmin)
		}
		admin := role == api.RoleAdmin

		cctx := ctx
		if secured {
			cctx = breaking(ctx)
		}
		status, e, _ := check.call(cctx, ts.url, "", method, path, body)
		if wantAuth := secured || path == "/metrics"; (status == 401) != wantAuth || wantAuth && e.Code != "unauthorized" {
			t.Errorf("%s without a token: %d %+v; want 401: %t", op, status, e, wantAuth)
		}
		if status, e, _ := check.call(ctx, ts.url, "lease-secret-wrong", method, path, body); secured && (status != 401 || e.Code != "unauthorized") {
			t.Errorf("%s with a wrong token: %d %+v; want 401", op, status, e)
		}
		status, e, _ = check.call(ctx, ts.url, leaseTok, method, path, body)
		if (status == 403) != admin || status == 401 || admin && e.Code != "forbidden" {
			t.Errorf("%s with a lease token: %d %+v; want 403: %t", op, status, e, admin)
		}
		if status, e, _ := check.call(ctx, ts.url, adminTok, method, path, body); status == 401 || status == 403 {
			t.Errorf("%s with an admin token: %d %+v", op, status, e)
		}
	}
	check.mu.Lock()
	defer check.mu.Unlock()
	for _, s := range []string{"PATCH /v1/pools/{name}", "POST /v1/leases", "GET /v1/pools"} {
		if !check.answered[s][200] && !check.answered[s][202] {
			t.Errorf("%s never succeeded with a token: %v", s, check.answered[s])
		}
	}
}
