package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// TestLeaseOwnershipOverHTTP: through the API and the CLI, a lease token
// sees and acts only on its own leases; another's answers 404 as if it did
// not exist; client tokens are scoped per token; the admin sees all.
func TestLeaseOwnershipOverHTTP(t *testing.T) {
	const aliceTok, bobTok, adminTok = "alice-secret-0123456789", "bob-secret-0123456789ab", "admin-secret-0123456789"
	ts := startTest(t, testTOML(t.TempDir(), "demo", "")+`
[[server.tokens]]
name = "alice"
role = "lease"
token = "`+aliceTok+`"
[[server.tokens]]
name = "bob"
role = "lease"
token = "`+bobTok+`"
[[server.tokens]]
name = "ops"
role = "admin"
token = "`+adminTok+`"
`, nil)
	ts.client.Token = adminTok // for the harness's own checks
	ctx := context.Background()
	alice := &api.Client{BaseURL: ts.url, Token: aliceTok}
	bob := &api.Client{BaseURL: ts.url, Token: bobTok}

	mine, err := alice.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s", ClientToken: "gitlab-job-42"})
	if err != nil || mine.State != pool.LeaseActive || mine.Worker.Password == "" {
		t.Fatalf("alice's lease: %+v, %v", mine, err)
	}
	for _, c := range []struct{ method, path, body string }{
		{"GET", "/v1/leases/" + mine.ID, ""},
		{"POST", "/v1/leases/" + mine.ID + "/renew", ""},
		{"DELETE", "/v1/leases/" + mine.ID + "?discard=true", ""},
		{"POST", "/v1/leases/" + mine.ID + "/runs", `{"command":["id"]}`},
		{"GET", "/v1/leases/" + mine.ID + "/output", ""},
	} {
		status, e := call(t, ts.url, c.method, c.path, c.body, bobTok)
		if status != 404 || e.Code != "not_found" {
			t.Errorf("bob: %s %s = %d %+v, want 404 not_found", c.method, c.path, status, e)
		}
	}
	theirs, err := bob.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s", ClientToken: "gitlab-job-42"})
	if err != nil || theirs.ID == mine.ID || theirs.Worker.Password == mine.Worker.Password {
		t.Fatalf("bob's lease with alice's client token: %+v, %v; want a lease of his own", theirs, err)
	}
	insts, err := bob.Instances(ctx, "demo")
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range insts {
		if in.LeaseID == mine.ID {
			t.Errorf("bob sees alice's lease id on %s", in.ID)
		}
	}

	// hangar leases: each sees its own; the admin sees both and whose.
	srv := "--server=" + ts.url
	code, out, errOut := runCLI(t, srv, "--token", aliceTok, "leases", "--state", "active")
	if code != 0 || !strings.Contains(out, mine.ID) || strings.Contains(out, theirs.ID) || strings.Contains(out, mine.Worker.Password) {
		t.Errorf("alice: hangar leases: exit %d, %s\n%s", code, errOut, out)
	}
	code, out, errOut = runCLI(t, srv, "--token", adminTok, "leases", "--pool", "demo", "-o", "json")
	var all []pool.LeaseView
	if code != 0 || json.Unmarshal([]byte(out), &all) != nil || len(all) != 2 {
		t.Fatalf("admin: hangar leases -o json: exit %d, %s\n%s", code, errOut, out)
	}
	owners := map[string]string{}
	for _, v := range all {
		owners[v.ID] = v.Owner
		if v.Worker.Password != "" {
			t.Error("a lease list carries a worker password")
		}
	}
	if owners[mine.ID] != "alice" || owners[theirs.ID] != "bob" {
		t.Errorf("owners in the admin's list: %v", owners)
	}
	if code, _, errOut := runCLI(t, srv, "--token", aliceTok, "leases", "--state", "bogus"); code == 0 || !strings.Contains(errOut, "state") {
		t.Errorf("hangar leases --state bogus: exit %d, %s", code, errOut)
	}

	// The owner and the admin can end them; bob's attempt above changed
	// nothing.
	if v, err := alice.GetLease(ctx, mine.ID, 0); err != nil || v.State != pool.LeaseActive {
		t.Fatalf("alice's lease after bob's tries: %+v, %v", v, err)
	}
	if err := alice.Release(ctx, mine.ID, true); err != nil {
		t.Fatal(err)
	}
	admin := &api.Client{BaseURL: ts.url, Token: adminTok}
	if err := admin.Release(ctx, theirs.ID, true); err != nil {
		t.Fatalf("admin releasing bob's lease: %v", err)
	}
	for _, v := range []pool.LeaseView{mine, theirs} {
		waitGone(t, ts, v.Instance.ID)
	}
}
