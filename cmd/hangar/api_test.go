package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// Every endpoint answers bad input with a clear JSON error and the right
// status, and changes nothing.
func TestAPIBadInput(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	active := ts.lease(t, api.LeaseRequest{Pool: "demo"})
	ended := ts.lease(t, api.LeaseRequest{Pool: "demo"})
	if err := ts.client.Release(context.Background(), ended.ID, true); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, method, path, body string
		status                   int
		code, msg                string
	}{
		{"unknown pool", "POST", "/v1/leases", `{"pool":"nope"}`, 404, "not_found", `unknown pool "nope"`},
		{"no pool", "POST", "/v1/leases", `{}`, 400, "bad_request", "pool is required"},
		{"unknown field", "POST", "/v1/leases", `{"pool":"demo","colour":"red"}`, 400, "bad_request", `unknown field "colour"`},
		{"not json", "POST", "/v1/leases", `pool=demo`, 400, "bad_request", "bad request body"},
		{"two values", "POST", "/v1/leases", `{"pool":"demo"}{}`, 400, "bad_request", "more than one JSON value"},
		{"wrong type", "POST", "/v1/leases", `{"pool":7}`, 400, "bad_request", "bad request body"},
		{"bad wait", "POST", "/v1/leases", `{"pool":"demo","wait":"soon"}`, 400, "bad_request", `wait: "soon" is not a duration`},
		{"negative ttl", "POST", "/v1/leases", `{"pool":"demo","ttl":"-1h"}`, 400, "bad_request", "ttl"},
		{"wait too long", "POST", "/v1/leases", `{"pool":"demo","wait":"16m"}`, 400, "bad_request", "wait must be between 0s and 15m0s"},
		{"ttl over max", "POST", "/v1/leases", `{"pool":"demo","ttl":"25h"}`, 400, "bad_request", "max_lease_ttl (24h0m0s)"},
		{"bad worker name", "POST", "/v1/leases", `{"pool":"demo","worker":{"name":"a b; rm -rf /"}}`, 400, "bad_request", "worker.name must be"},
		{"bad master", "POST", "/v1/leases", `{"pool":"demo","worker":{"master":"nohost"}}`, 400, "bad_request", "worker.master must be host:port"},
		{"control char password", "POST", "/v1/leases", `{"pool":"demo","worker":{"password":"a\nb"}}`, 400, "bad_request", "worker.password"},
		{"several problems at once", "POST", "/v1/leases", `{"pool":"demo","worker":{"name":"-x","master":"y"}}`, 400, "bad_request", "worker.name must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit\nworker.master must be host:port"},
		{"huge body", "POST", "/v1/leases", `{"pool":"` + strings.Repeat("x", 3<<20) + `"}`, 400, "bad_request", "request body too large"},
		{"unknown lease", "GET", "/v1/leases/l-nope", ``, 404, "not_found", `unknown lease "l-nope"`},
		{"bad get wait", "GET", "/v1/leases/" + active.ID + "?wait=x", ``, 400, "bad_request", "wait"},
		{"renew unknown", "POST", "/v1/leases/l-nope/renew", ``, 404, "not_found", "unknown lease"},
		{"renew ended", "POST", "/v1/leases/" + ended.ID + "/renew", ``, 409, "conflict", "lease has ended"},
		{"release unknown", "DELETE", "/v1/leases/l-nope", ``, 404, "not_found", "unknown lease"},
		{"bad discard", "DELETE", "/v1/leases/" + active.ID + "?discard=maybe", ``, 400, "bad_request", `discard: "maybe"`},
		{"scale unknown pool", "PATCH", "/v1/pools/nope", `{"min_idle":1}`, 404, "not_found", "unknown pool"},
		{"scale nothing", "PATCH", "/v1/pools/demo", `{}`, 400, "bad_request", "give min_idle, max_instances or both"},
		{"scale below min", "PATCH", "/v1/pools/demo", `{"min_idle":5,"max_instances":2}`, 400, "bad_request", "max_instances (2) must be ≥ min_idle (5)"},
		{"scale negative", "PATCH", "/v1/pools/demo", `{"min_idle":-1}`, 400, "bad_request", "min_idle must be ≥ 0"},
		{"scale unknown field", "PATCH", "/v1/pools/demo", `{"max":3}`, 400, "bad_request", `unknown field "max"`},
		{"instances of unknown pool", "GET", "/v1/instances?pool=nope", ``, 404, "not_found", "unknown pool"},
		{"drain unknown", "POST", "/v1/instances/i-0000000000000000f/drain", ``, 404, "not_found", "unknown instance"},
		{"console unknown", "GET", "/v1/instances/i-0000000000000000f/console", ``, 404, "not_found", "unknown instance"},
		{"unknown endpoint", "GET", "/v1/nothing", ``, 404, "not_found", "no API endpoint GET /v1/nothing"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			status, e := call(t, ts.url, c.method, c.path, c.body, "")
			if status != c.status || e.Code != c.code || !strings.Contains(e.Message, c.msg) {
				t.Errorf("%s %s = %d %+v; want %d %s containing %q", c.method, c.path, status, e, c.status, c.code, c.msg)
			}
		})
	}
	// Nothing changed: the active lease still holds its instance, the pool
	// still has its limits, no lease was queued.
	got, err := ts.client.GetLease(context.Background(), active.ID, 0)
	if err != nil || got.State != pool.LeaseActive {
		t.Errorf("active lease after bad input: %+v, %v", got, err)
	}
	pools, _ := ts.client.Pools(context.Background())
	if p := pools[0]; p.MinIdle != 0 || p.MaxInstances != 3 || p.LeasesPending != 0 {
		t.Errorf("pool after bad input: %+v", p)
	}
}

type apiErr struct {
	Message string `json:"error"`
	Code    string `json:"code"`
}

func call(t *testing.T, base, method, path, body, token string) (int, apiErr) {
	t.Helper()
	req, _ := http.NewRequest(method, base+path, strings.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	var e apiErr
	_ = json.Unmarshal(b, &e) // a success is not an apiErr: e stays empty
	return resp.StatusCode, e
}

// With tokens configured: no token or a wrong one is 401, a lease token on
// an admin endpoint is 403, and no token ever reaches the log.
func TestAPIAuth(t *testing.T) {
	const leaseTok, adminTok = "lease-secret-0123456789", "admin-secret-9876543210"
	t.Setenv("TEST_ADMIN_TOKEN", adminTok)
	ts := startTest(t, testTOML(t.TempDir(), "demo", "")+`
[[server.tokens]]
name = "ci"
role = "lease"
token = "`+leaseTok+`"
[[server.tokens]]
name = "ops"
role = "admin"
token_env = "TEST_ADMIN_TOKEN"
`, nil)
	cases := []struct {
		name, method, path, body, token string
		status                          int
		code                            string
	}{
		{"no token", "GET", "/v1/pools", "", "", 401, "unauthorized"},
		{"wrong token", "GET", "/v1/pools", "", "lease-secret-0123456788", 401, "unauthorized"},
		{"lease token lists", "GET", "/v1/pools", "", leaseTok, 200, ""},
		{"lease token leases", "POST", "/v1/leases", `{"pool":"demo","wait":"0s"}`, leaseTok, 202, ""},
		{"lease token cannot scale", "PATCH", "/v1/pools/demo", `{"min_idle":0}`, leaseTok, 403, "forbidden"},
		{"lease token cannot drain", "POST", "/v1/instances/i-0000000000000000f/drain", "", leaseTok, 403, "forbidden"},
		{"lease token cannot read consoles", "GET", "/v1/instances/i-0000000000000000f/console", "", leaseTok, 403, "forbidden"},
		{"admin token scales", "PATCH", "/v1/pools/demo", `{"min_idle":0}`, adminTok, 200, ""},
		{"admin token leases", "GET", "/v1/instances", "", adminTok, 200, ""},
		{"metrics need a token", "GET", "/metrics", "", "", 401, "unauthorized"},
		{"lease token reads metrics", "GET", "/metrics", "", leaseTok, 200, ""},
		{"health needs no token", "GET", "/healthz", "", "", 200, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			status, e := call(t, ts.url, c.method, c.path, c.body, c.token)
			if status != c.status || e.Code != c.code {
				t.Errorf("%s %s = %d %+v; want %d %q", c.method, c.path, status, e, c.status, c.code)
			}
		})
	}
	time.Sleep(100 * time.Millisecond)
	if l := ts.logs.String(); strings.Contains(l, leaseTok) || strings.Contains(l, adminTok) || strings.Contains(l, "secret-") {
		t.Error("a token reached the server log")
	}
}

// A non-loopback listen address with no tokens refuses to start.
func TestOpenModeOnlyOnLoopback(t *testing.T) {
	cfg := testTOML(t.TempDir(), "demo", "")
	cfg = replaceOnce(cfg, `listen = "127.0.0.1:0"`, `listen = "0.0.0.0:0"`)
	var out, errOut strings.Builder
	path := t.TempDir() + "/hangar.toml"
	writeFile(t, path, cfg)
	if code := run([]string{"serve", "--config", path}, &out, &errOut); code == 0 || !strings.Contains(errOut.String(), "tokens") {
		t.Errorf("serve on 0.0.0.0 without tokens: exit %d, %q", code, errOut.String())
	}
}
