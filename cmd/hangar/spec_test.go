package main

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/configs"
	"github.com/hangar-ci/hangar/pool"
)

// min_idle = "auto" maps to pool.Spec.Autoscale; a number to MinIdle.
func TestPoolSpecAutoscale(t *testing.T) {
	cfg, err := configs.Parse("hangar.toml", []byte(`
[providers.local]
type = "local"
[pools.fixed]
provider = "local"
min_idle = 2
[pools.auto]
provider = "local"
min_idle = "auto"
max_instances = 30
idle_ttd = "3m"
[pools.auto.autoscale]
target_wait_p95 = "8s"
[pools.capped]
provider = "local"
min_idle = "auto"
autoscale = { max_idle = 3 }
`))
	if err != nil {
		t.Fatal(err)
	}
	o := poolOptions(cfg)
	if s := o.Pools["fixed"]; s.MinIdle != 2 || s.Autoscale != nil {
		t.Errorf("fixed: min_idle %d, autoscale %+v; want 2, none", s.MinIdle, s.Autoscale)
	}
	if s := o.Pools["auto"]; s.Autoscale == nil || *s.Autoscale != (pool.AutoscaleSpec{TargetWaitP95: 8 * time.Second, MaxIdle: 20}) ||
		s.MinIdle != 0 || s.IdleTTD != 3*time.Minute {
		t.Errorf("auto: %+v, min_idle %d, idle_ttd %s", s.Autoscale, s.MinIdle, s.IdleTTD)
	}
	if s := o.Pools["capped"]; s.Autoscale == nil || *s.Autoscale != (pool.AutoscaleSpec{TargetWaitP95: 5 * time.Second, MaxIdle: 3}) {
		t.Errorf("capped: %+v", s.Autoscale)
	}
}

// An autoscaled pool on a running server: hangar pools shows its target
// and why, the API's answer holds to the OpenAPI document, the gauge is
// exported, and scale --min-idle is refused with the way out.
func TestAutoscaledPoolServed(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", "min_idle = \"auto\"\nmax_instances = 6\n[pools.demo.autoscale]\ntarget_wait_p95 = \"5s\"\n"), nil)
	srv := "--server=" + ts.url
	code, out, errOut := runCLI(t, srv, "pools")
	if code != 0 || !strings.Contains(out, "auto: 0 (rate 0/min, boot 60s)") {
		t.Errorf("pools: %d\n%s%s", code, out, errOut)
	}

	code, out, errOut = runCLI(t, srv, "pools", "-o", "json")
	var views []any
	if code != 0 || json.Unmarshal([]byte(out), &views) != nil || len(views) != 1 {
		t.Fatalf("pools -o json: %d %s %s", code, out, errOut)
	}
	schema := openAPIDoc(t).Components.Schemas["Pool"].Value
	if err := schema.VisitJSON(views[0]); err != nil {
		t.Errorf("an autoscaled pool's view against the document's Pool: %v\n%s", err, out)
	}
	var v []pool.PoolView
	if err := json.Unmarshal([]byte(out), &v); err != nil || v[0].Autoscale == nil ||
		*v[0].Autoscale != (pool.AutoscaleView{IdleTTDSeconds: 60, BootSeconds: 60, Reason: "rate 0/min, boot 60s", TargetWaitP95: 5, MaxIdle: 6}) {
		t.Errorf("pools -o json: %s", out)
	}

	resp, err := http.Get(ts.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close() // read to the end already
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := parseExposition(t, string(body)).samples[`hangar_autoscale_target_idle{pool="demo"}`]; !ok || got != 0 {
		t.Errorf("hangar_autoscale_target_idle{pool=\"demo\"} = %v (exported: %v)", got, ok)
	}

	code, _, errOut = runCLI(t, srv, "scale", "demo", "--min-idle", "2")
	if code == 0 || !strings.Contains(errOut, `pool demo sizes its spares itself (min_idle = "auto")`) {
		t.Errorf("scale --min-idle on an autoscaled pool: %d %q", code, errOut)
	}
	if code, out, errOut := runCLI(t, srv, "scale", "demo", "--max", "4"); code != 0 || !strings.Contains(out, "min_idle auto: 0 (") {
		t.Errorf("scale --max on an autoscaled pool: %d %q %q", code, out, errOut)
	}
}

// launch_batch maps to pool.Spec.LaunchBatch; unset, it is 50.
func TestPoolSpecLaunchBatch(t *testing.T) {
	cfg, err := configs.Parse("hangar.toml", []byte(`
[providers.local]
type = "local"
[pools.one]
provider = "local"
launch_batch = 1
[pools.many]
provider = "local"
`))
	if err != nil {
		t.Fatal(err)
	}
	o := poolOptions(cfg)
	if got := o.Pools["one"].LaunchBatch; got != 1 {
		t.Errorf("one: launch_batch %d, want 1", got)
	}
	if got := o.Pools["many"].LaunchBatch; got != 50 {
		t.Errorf("many: launch_batch %d, want 50", got)
	}
}
