package metrics

import (
	"context"
	"errors"
	"fmt"
	"testing"

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
