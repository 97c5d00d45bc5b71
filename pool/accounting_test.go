package pool

import (
	"testing"
	"time"

	"github.com/hangar-ci/hangar/metrics"
	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
)

// TestGoneInstancesCostNothing: hangar_instance_seconds_total, which
// operators sum for the bill, stops growing once an instance is gone, also
// across a restart. It used to keep counting under state="gone".
func TestGoneInstancesCostNothing(t *testing.T) {
	h := newHarness(t, nil)
	h.shutdown()
	h.metrics = metrics.New(prometheus.NewRegistry(), func() metrics.Snapshot { return metrics.Snapshot{} })
	h.open()
	id := h.warm(1)[0]
	h.clock.Advance(time.Minute)
	h.tick()
	idle := promtest.ToFloat64(h.metrics.InstanceSeconds.WithLabelValues("demo", string(Idle)))
	if idle < 60 {
		t.Fatalf("idle seconds after a minute idle: %v", idle)
	}
	h.m.mu.Lock()
	h.m.terminateLocked(h.m.byID[id], "test")
	h.m.unlock()
	h.settle()
	if st := h.state(id); st != Gone {
		t.Fatalf("instance is %s, want gone", st)
	}
	for range 3 {
		h.clock.Advance(10 * time.Minute)
		h.tick()
	}
	h.restart()
	h.clock.Advance(10 * time.Minute)
	h.tick()
	if n := promtest.ToFloat64(h.metrics.InstanceSeconds.WithLabelValues("demo", string(Gone))); n != 0 {
		t.Fatalf("hangar_instance_seconds_total{state=gone} = %v, want 0", n)
	}
}
