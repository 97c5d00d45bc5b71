package main

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
	"github.com/hangar-ci/hangar/userdata"
)

// A batch of three on EC2 (the test server, its instances real ones of the
// local cloud behind it): one RunInstances, one user-data holding no
// instance's token, three instances that enroll through generic.sh and
// serve a lease each; once they have, the batch token opens nothing.
func TestEC2BatchEndToEnd(t *testing.T) {
	srv, localDir := ec2Cloud(t)
	ts := startTest(t, ec2TOML(t.TempDir(), srv.URL(), "min_idle = 3\nmax_instances = 3\nlaunch_batch = 3"), nil)
	testutil.Eventually(t, "three idle instances", 90*time.Second, func() bool { return ts.countState(t, "ci", pool.Idle) == 3 })

	if n := srv.Calls()["RunInstances"]; n != 1 {
		t.Errorf("%d RunInstances for a batch of 3, want 1", n)
	}
	insts := srv.Instances()
	if len(insts) != 3 {
		t.Fatalf("EC2 has %d instances, want 3", len(insts))
	}
	userData := string(insts[0].UserData)
	indexes := map[int]bool{}
	for _, in := range insts {
		if string(in.UserData) != userData {
			t.Errorf("instance %s has a user-data of its own", in.ID)
		}
		indexes[in.LaunchIndex] = true
	}
	if len(indexes) != 3 {
		t.Errorf("launch indexes %v, want 0, 1 and 2", indexes)
	}
	env := userdata.Exports(insts[0].UserData)
	if env["HANGAR_ENROLL"] != "1" || env["HANGAR_BOOTSTRAP_TOKEN"] == "" {
		t.Fatalf("the batch's user-data does not enroll:\n%s", userData)
	}

	// Three builds at once, one on each instance.
	ctx := context.Background()
	var wg sync.WaitGroup
	leases := make([]pool.LeaseView, 3)
	for i := range leases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			leases[i] = ts.lease(t, api.LeaseRequest{Pool: "ci", Worker: pool.Worker{Name: fmt.Sprintf("w%d", i), Master: "ci.example:9989"}})
		}()
	}
	wg.Wait()
	served := map[string]bool{}
	for _, l := range leases {
		served[l.Instance.ID] = true
		got := readWorkerEnv(t, localDir, l.Instance.ID)
		if got["HANGAR_WORKER_NAME"] != l.Worker.Name || got["HANGAR_WORKER_PASSWORD"] != l.Worker.Password {
			t.Errorf("instance %s runs worker %q, want %q of lease %s", l.Instance.ID, got["HANGAR_WORKER_NAME"], l.Worker.Name, l.ID)
		}
		if err := ts.client.Release(ctx, l.ID, false); err != nil {
			t.Error(err)
		}
	}
	if len(served) != 3 {
		t.Errorf("the three leases went to %d instances, want 3", len(served))
	}

	// What a build can read from the user-data now opens nothing.
	for _, in := range insts {
		form := url.Values{"instance_id": {in.ID}, "enroll_key": {strings.Repeat("ab", 32)}}
		code := postForm(t, env["HANGAR_URL"]+"/bootstrap/v1/enroll", env["HANGAR_BOOTSTRAP_TOKEN"], form)
		if code != http.StatusUnauthorized {
			t.Errorf("enrolling %s again with the batch token: %d, want 401", in.ID, code)
		}
	}
	if code := postForm(t, env["HANGAR_URL"]+"/bootstrap/v1/ready", env["HANGAR_BOOTSTRAP_TOKEN"], url.Values{}); code != http.StatusUnauthorized {
		t.Errorf("ready with the batch token: %d, want 401", code)
	}
	if n := strings.Count(ts.logs.String(), "instance enrolled"); n != 3 {
		t.Errorf("%d enrollments logged, want 3", n)
	}
	if strings.Contains(ts.logs.String(), env["HANGAR_BOOTSTRAP_TOKEN"]) {
		t.Error("the batch token is in the server's log")
	}
}

// A cloud that answers the client-token filter with an HTML 500 (as some
// EC2-compatible clouds do): the pool still launches, and `hangar pools`
// says which filter the cloud refused and what Hangar does instead.
func TestEC2RefusedFilterShown(t *testing.T) {
	srv, _ := ec2Cloud(t)
	srv.RefuseFilter("client-token", ec2test.HTML500)
	ts := startTest(t, ec2TOML(t.TempDir(), srv.URL(), "min_idle = 1\nmax_instances = 1"), nil)
	testutil.Eventually(t, "an idle instance", 90*time.Second, func() bool { return ts.countState(t, "ci", pool.Idle) == 1 })
	pools, err := ts.client.Pools(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(pools) != 1 || len(pools[0].CloudNotes) != 1 || !strings.Contains(pools[0].CloudNotes[0], "client-token") {
		t.Fatalf("pools = %+v, want a note of the refused client-token filter", pools)
	}
	code, out, errOut := runCLI(t, "--server", ts.url, "pools")
	if code != 0 || !strings.Contains(out, "note: "+pools[0].CloudNotes[0]) {
		t.Errorf("hangar pools exited %d:\n%s%s\nwant the note %q", code, out, errOut, pools[0].CloudNotes[0])
	}
	if n := strings.Count(ts.logs.String(), "client-token"); n != 1 {
		t.Errorf("the refusal is logged %d times, want once:\n%s", n, grepLines(ts.logs.String(), "client-token"))
	}
}

func postForm(t *testing.T, u, token string, form url.Values) int {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, u, strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	return resp.StatusCode
}
