package metrics

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// failing is a provider whose every call fails with err (nil: succeeds).
type failing struct{ err error }

func (f failing) Capabilities() cloud.Capabilities { return cloud.Capabilities{} }
func (f failing) Launch(context.Context, cloud.LaunchSpec, int) ([]cloud.Instance, error) {
	return nil, f.err
}
func (f failing) List(context.Context, map[string]string) ([]cloud.Instance, error) {
	return nil, f.err
}
func (f failing) Terminate(context.Context, []string) ([]string, error) { return nil, f.err }
func (f failing) Stop(context.Context, []string) ([]string, error)      { return nil, f.err }
func (f failing) Start(context.Context, []string) ([]string, error)     { return nil, f.err }
func (f failing) ConsoleOutput(context.Context, string) ([]byte, error) { return nil, f.err }
func (f failing) Close() error                                          { return nil }

// storing is a provider that also has Storage.
type storing struct {
	failing
	cloud.Storage
}

// TestCloudCallsCountedByOutcome: every call is counted under the class of
// the error it returned. A deferred observe(…, err) once counted every call
// as "ok".
func TestCloudCallsCountedByOutcome(t *testing.T) {
	classes := map[string]error{
		"ok":            nil,
		"capacity":      fmt.Errorf("launching: %w", cloud.ErrCapacity),
		"quota":         fmt.Errorf("launching: %w", cloud.ErrQuota),
		"throttled":     fmt.Errorf("listing: %w", cloud.ErrThrottled),
		"not_found":     fmt.Errorf("terminating: %w", cloud.ErrNotFound),
		"not_supported": cloud.ErrNotSupported,
		"canceled":      context.Canceled,
		"error":         errors.New("boom"),
	}
	ops := map[string]func(cloud.Provider) error{
		"launch": func(p cloud.Provider) error {
			_, err := p.Launch(context.Background(), cloud.LaunchSpec{}, 1)
			return err
		},
		"list":           func(p cloud.Provider) error { _, err := p.List(context.Background(), nil); return err },
		"terminate":      func(p cloud.Provider) error { _, err := p.Terminate(context.Background(), nil); return err },
		"stop":           func(p cloud.Provider) error { _, err := p.Stop(context.Background(), nil); return err },
		"start":          func(p cloud.Provider) error { _, err := p.Start(context.Background(), nil); return err },
		"console_output": func(p cloud.Provider) error { _, err := p.ConsoleOutput(context.Background(), "i-1"); return err },
	}
	for class, err := range classes {
		m := New(prometheus.NewRegistry(), func() Snapshot { return Snapshot{} })
		p := m.Instrument("east", failing{err})
		for op, call := range ops {
			if got := call(p); !errors.Is(got, err) {
				t.Fatalf("%s through the wrapper returned %v, want %v", op, got, err)
			}
			if n := testutil.ToFloat64(m.CloudCalls.WithLabelValues("east", op, class)); n != 1 {
				t.Errorf("%s failing with %v: hangar_cloud_api_calls_total{outcome=%q} = %v, want 1", op, err, class, n)
			}
		}
		if n := testutil.CollectAndCount(m.CloudCalls); n != len(ops) {
			t.Errorf("class %s: %d series, want %d (one per operation, none under another outcome)", class, n, len(ops))
		}
	}
}

// TestInstrumentKeepsStorage: a wrapped provider's Storage stays reachable.
func TestInstrumentKeepsStorage(t *testing.T) {
	m := New(prometheus.NewRegistry(), func() Snapshot { return Snapshot{} })
	if _, ok := cloud.StorageOf(m.Instrument("local", storing{})); !ok {
		t.Fatal("the instrumented provider lost its Storage")
	}
	if _, ok := cloud.StorageOf(m.Instrument("plain", failing{})); ok {
		t.Fatal("a provider without Storage grew one")
	}
}

// TestAgeGauges: the ages alerts read come out in seconds, and a pool not
// reconciled since the start reads 0, not the zero time's Unix seconds.
func TestAgeGauges(t *testing.T) {
	at := time.Unix(1_900_000_000, 500_000_000)
	reg := prometheus.NewRegistry()
	New(reg, func() Snapshot {
		return Snapshot{
			OldestPending:  map[string]time.Duration{"ci": 90 * time.Second, "idle": 0},
			LongestInState: map[[2]string]time.Duration{{"ci", "booting"}: 2 * time.Minute},
			ReconciledAt:   map[string]time.Time{"ci": at, "new": {}},
		}
	})
	want := `
# HELP hangar_instance_longest_in_state_seconds How long the pool's instance longest in the state has been in it; 0 when none is.
# TYPE hangar_instance_longest_in_state_seconds gauge
hangar_instance_longest_in_state_seconds{pool="ci",state="booting"} 120
# HELP hangar_lease_oldest_pending_seconds How long the pool's longest-waiting pending lease has waited; 0 when none waits.
# TYPE hangar_lease_oldest_pending_seconds gauge
hangar_lease_oldest_pending_seconds{pool="ci"} 90
hangar_lease_oldest_pending_seconds{pool="idle"} 0
# HELP hangar_reconcile_last_success_timestamp_seconds Unix time when reconcile last applied a listing of the pool's cloud; 0 until the first since the start.
# TYPE hangar_reconcile_last_success_timestamp_seconds gauge
hangar_reconcile_last_success_timestamp_seconds{pool="ci"} 1.9000000005e+09
hangar_reconcile_last_success_timestamp_seconds{pool="new"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"hangar_instance_longest_in_state_seconds", "hangar_lease_oldest_pending_seconds", "hangar_reconcile_last_success_timestamp_seconds"); err != nil {
		t.Error(err)
	}
}

// TestBuildInfo: given values are used as they are; empty ones fall back
// to what the toolchain stamped, or "unknown", never an empty label.
func TestBuildInfo(t *testing.T) {
	for _, tc := range []struct{ version, commit string }{
		{"v1.2.3", "0123abc"},
		{"", ""},
	} {
		reg := prometheus.NewRegistry()
		RegisterBuildInfo(reg, tc.version, tc.commit)
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		if len(mfs) != 1 || mfs[0].GetName() != "hangar_build_info" || len(mfs[0].GetMetric()) != 1 {
			t.Fatalf("gathered %v, want one hangar_build_info series", mfs)
		}
		m := mfs[0].GetMetric()[0]
		if v := m.GetGauge().GetValue(); v != 1 {
			t.Errorf("hangar_build_info = %v, want 1", v)
		}
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["goversion"] != runtime.Version() {
			t.Errorf("goversion = %q, want %q", labels["goversion"], runtime.Version())
		}
		for name, given := range map[string]string{"version": tc.version, "commit": tc.commit} {
			switch got := labels[name]; {
			case given != "" && got != given:
				t.Errorf("%s = %q, want %q as given", name, got, given)
			case got == "":
				t.Errorf("%s is empty (given %q)", name, given)
			}
		}
	}
}
