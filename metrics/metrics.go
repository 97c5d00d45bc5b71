// Package metrics holds Hangar's Prometheus collectors. Labels carry pool,
// state, operation and outcome names only: never a token, password or
// anything an instance sent.
package metrics

import (
	"cmp"
	"context"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the collectors the pool manager and providers update.
type Metrics struct {
	LeaseWait       *prometheus.HistogramVec // pool, kind=warm|cold
	BootSeconds     *prometheus.HistogramVec // pool
	CloudCalls      *prometheus.CounterVec   // provider, operation, outcome
	CloudSeconds    *prometheus.HistogramVec // provider, operation
	Reaped          *prometheus.CounterVec   // pool, reason
	InstanceSeconds *prometheus.CounterVec   // pool, state
	LaunchErrors    *prometheus.CounterVec   // pool, class
	APICalls        *prometheus.CounterVec   // provider, action, code: each HTTP call a provider makes
	APISeconds      *prometheus.HistogramVec // provider, action
	StoreRepairs    *prometheus.CounterVec   // kind: what restore found broken and mended
	Enrollments     *prometheus.CounterVec   // pool, result: enrollments of batched launches' instances
	// IllegalTransitions counts refused state transitions by machine
	// (instance, lease): bugs, each also logged at error.
	IllegalTransitions *prometheus.CounterVec
	// Build caches (pool/cache.go).
	CacheSnapshots       *prometheus.CounterVec   // pool, outcome=ok|failed
	CacheSnapshotSeconds *prometheus.HistogramVec // pool
	CacheSnapshotBytes   *prometheus.GaugeVec     // pool: the last snapshot's size
}

// Snapshot is what the pool reports at each scrape.
type Snapshot struct {
	Instances     map[[2]string]int // {pool, state} → count
	LeasesActive  map[string]int    // pool → count
	LeasesPending map[string]int
	LaunchBlocked map[string]bool // pool → launches stopped by a quota error
	CacheVolumes  map[string]int  // pool → cache volumes attached to its instances
	// OldestPending: pool → how long its longest-waiting pending lease has
	// waited (0: none waits).
	OldestPending map[string]time.Duration
	// LongestInState: {pool, state} → how long the pool's instance that
	// has been in the state longest has been in it (0: none is).
	LongestInState map[[2]string]time.Duration
	// ReconciledAt: pool → when reconcile last applied a listing of its
	// cloud (zero: not since the start).
	ReconciledAt map[string]time.Time
	// AutoscaleTarget: pool → the idle spares it aims at now, for the pools
	// with min_idle = "auto".
	AutoscaleTarget map[string]int
}

// New registers Hangar's collectors on reg. snapshot is called at every
// scrape for the gauges; it must be cheap and safe to call concurrently.
func New(reg prometheus.Registerer, snapshot func() Snapshot) *Metrics {
	m := &Metrics{
		LeaseWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hangar_lease_wait_seconds",
			Help:    "Time from a lease request to its fulfilment; warm leases took an idle instance, cold ones waited for a boot.",
			Buckets: []float64{.001, .005, .025, .1, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600},
		}, []string{"pool", "kind"}),
		BootSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hangar_boot_seconds",
			Help:    "Time from launch (or start) to the instance's ready report.",
			Buckets: []float64{.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600},
		}, []string{"pool"}),
		CloudCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_cloud_api_calls_total",
			Help: "Cloud API calls by provider, operation and outcome (ok or an error class).",
		}, []string{"provider", "operation", "outcome"}),
		CloudSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hangar_cloud_api_seconds",
			Help:    "Latency of cloud API calls.",
			Buckets: prometheus.ExponentialBuckets(.001, 4, 9),
		}, []string{"provider", "operation"}),
		Reaped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_reaped_instances_total",
			Help: "Instances terminated or stopped by Hangar, by reason.",
		}, []string{"pool", "reason"}),
		InstanceSeconds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_instance_seconds_total",
			Help: "Instance-seconds spent in each state: what idle capacity costs.",
		}, []string{"pool", "state"}),
		LaunchErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_launch_errors_total",
			Help: "Failed launches by pool and error class.",
		}, []string{"pool", "class"}),
		APICalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_cloud_requests_total",
			Help: "Requests to a cloud's API (each retry counts) by action and the cloud's error code (\"ok\" for none).",
		}, []string{"provider", "action", "code"}),
		APISeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hangar_cloud_request_seconds",
			Help:    "Latency of requests to a cloud's API.",
			Buckets: prometheus.ExponentialBuckets(.001, 4, 9),
		}, []string{"provider", "action"}),
		StoreRepairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_store_repairs_total",
			Help: "Records restore found inconsistent (a torn write, an older version's state) and mended, by kind.",
		}, []string{"kind"}),
		Enrollments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_enrollments_total",
			Help: "Enrollments of instances of batched launches by pool and result: ok, pending (the launch had not answered), or the reason refused.",
		}, []string{"pool", "result"}),
		IllegalTransitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_illegal_transitions_total",
			Help: "State transitions refused as illegal, by state machine: each one is a bug, logged at error.",
		}, []string{"machine"}),
		CacheSnapshots: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_cache_snapshots_total",
			Help: "Snapshots of ending instances' cache volumes, by outcome (ok, failed); a failed one leaves the previous snapshot current.",
		}, []string{"pool", "outcome"}),
		CacheSnapshotSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hangar_cache_snapshot_seconds",
			Help:    "Time the cloud took to take a cache snapshot (the call; the copy may complete later).",
			Buckets: prometheus.ExponentialBuckets(.01, 4, 9),
		}, []string{"pool"}),
		CacheSnapshotBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "hangar_cache_snapshot_bytes",
			Help: "Size of the pool's latest cache snapshot (its volume's size).",
		}, []string{"pool"}),
	}
	reg.MustRegister(m.LeaseWait, m.BootSeconds, m.CloudCalls, m.CloudSeconds, m.Reaped, m.InstanceSeconds, m.LaunchErrors, m.APICalls, m.APISeconds, m.StoreRepairs, m.Enrollments, m.IllegalTransitions,
		m.CacheSnapshots, m.CacheSnapshotSeconds, m.CacheSnapshotBytes)
	reg.MustRegister(&gauges{snapshot: snapshot})
	return m
}

var (
	instancesDesc     = prometheus.NewDesc("hangar_instances", "Instances by pool and Hangar state.", []string{"pool", "state"}, nil)
	leasesActiveDesc  = prometheus.NewDesc("hangar_leases_active", "Leases holding an instance.", []string{"pool"}, nil)
	leasesPendingDesc = prometheus.NewDesc("hangar_leases_pending", "Leases waiting for an instance.", []string{"pool"}, nil)
	launchBlockedDesc = prometheus.NewDesc("hangar_launch_blocked", "1 while a quota error stops launches for the pool.", []string{"pool"}, nil)
	cacheVolumesDesc  = prometheus.NewDesc("hangar_cache_volumes", "Cache volumes attached to the pool's instances.", []string{"pool"}, nil)
	oldestPendingDesc = prometheus.NewDesc("hangar_lease_oldest_pending_seconds",
		"How long the pool's longest-waiting pending lease has waited; 0 when none waits.", []string{"pool"}, nil)
	longestInStateDesc = prometheus.NewDesc("hangar_instance_longest_in_state_seconds",
		"How long the pool's instance longest in the state has been in it; 0 when none is.", []string{"pool", "state"}, nil)
	reconciledDesc = prometheus.NewDesc("hangar_reconcile_last_success_timestamp_seconds",
		"Unix time when reconcile last applied a listing of the pool's cloud; 0 until the first since the start.", []string{"pool"}, nil)
	autoscaleTargetDesc = prometheus.NewDesc("hangar_autoscale_target_idle",
		`The idle spares a pool with min_idle = "auto" aims at now.`, []string{"pool"}, nil)
)

// gauges reads the pool's state at scrape time instead of mirroring it, so
// the numbers can never drift from what the pool holds.
type gauges struct{ snapshot func() Snapshot }

func (g *gauges) Describe(ch chan<- *prometheus.Desc) {
	ch <- instancesDesc
	ch <- leasesActiveDesc
	ch <- leasesPendingDesc
	ch <- launchBlockedDesc
	ch <- cacheVolumesDesc
	ch <- oldestPendingDesc
	ch <- longestInStateDesc
	ch <- reconciledDesc
	ch <- autoscaleTargetDesc
}

func (g *gauges) Collect(ch chan<- prometheus.Metric) {
	s := g.snapshot()
	for k, n := range s.Instances {
		ch <- prometheus.MustNewConstMetric(instancesDesc, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
	for p, n := range s.LeasesActive {
		ch <- prometheus.MustNewConstMetric(leasesActiveDesc, prometheus.GaugeValue, float64(n), p)
	}
	for p, n := range s.LeasesPending {
		ch <- prometheus.MustNewConstMetric(leasesPendingDesc, prometheus.GaugeValue, float64(n), p)
	}
	for p, b := range s.LaunchBlocked {
		v := 0.0
		if b {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(launchBlockedDesc, prometheus.GaugeValue, v, p)
	}
	for p, n := range s.CacheVolumes {
		ch <- prometheus.MustNewConstMetric(cacheVolumesDesc, prometheus.GaugeValue, float64(n), p)
	}
	for p, d := range s.OldestPending {
		ch <- prometheus.MustNewConstMetric(oldestPendingDesc, prometheus.GaugeValue, d.Seconds(), p)
	}
	for k, d := range s.LongestInState {
		ch <- prometheus.MustNewConstMetric(longestInStateDesc, prometheus.GaugeValue, d.Seconds(), k[0], k[1])
	}
	for p, at := range s.ReconciledAt {
		v := 0.0 // the zero time's Unix seconds would be a large negative number
		if !at.IsZero() {
			v = float64(at.UnixNano()) / 1e9
		}
		ch <- prometheus.MustNewConstMetric(reconciledDesc, prometheus.GaugeValue, v, p)
	}
	for p, n := range s.AutoscaleTarget {
		ch <- prometheus.MustNewConstMetric(autoscaleTargetDesc, prometheus.GaugeValue, float64(n), p)
	}
}

// RegisterBuildInfo registers hangar_build_info{version,commit,goversion},
// always 1, so that dashboards can show which build runs and alerts can
// join on it. An empty version or commit is taken from what the Go
// toolchain stamped into the binary: the module version ("(devel)" for a
// build from a checkout) and the VCS revision.
func RegisterBuildInfo(reg prometheus.Registerer, version, commit string) {
	if bi, ok := debug.ReadBuildInfo(); ok {
		if version == "" {
			version = bi.Main.Version
		}
		for _, st := range bi.Settings {
			if commit == "" && st.Key == "vcs.revision" {
				commit = st.Value
			}
		}
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "hangar_build_info",
		Help: "Always 1; its labels name the running build.",
		ConstLabels: prometheus.Labels{
			"version":   cmp.Or(version, "unknown"),
			"commit":    cmp.Or(commit, "unknown"),
			"goversion": runtime.Version(),
		},
	})
	g.Set(1)
	reg.MustRegister(g)
}

// ObserveRequests returns a hook a provider calls for every request it
// sends to its cloud: action, the cloud's error code ("" for success) and
// latency.
func (m *Metrics) ObserveRequests(provider string) func(action, code string, d time.Duration) {
	return func(action, code string, d time.Duration) {
		if code == "" {
			code = "ok"
		}
		m.APICalls.WithLabelValues(provider, action, code).Inc()
		m.APISeconds.WithLabelValues(provider, action).Observe(d.Seconds())
	}
}

// Instrument wraps a provider so every call is counted and timed by
// operation and outcome.
func (m *Metrics) Instrument(name string, p cloud.Provider) cloud.Provider {
	return &instrumented{Provider: p, name: name, m: m}
}

type instrumented struct {
	cloud.Provider
	name string
	m    *Metrics
}

// Unwrap gives the provider counted, for its optional interfaces.
func (i *instrumented) Unwrap() cloud.Provider { return i.Provider }

// observe counts a call that has returned err. It is called after the
// call, never deferred with its arguments: a deferred observe(…, err)
// would take err as it was when the defer was set up, nil.
func (i *instrumented) observe(op string, start time.Time, err error) {
	i.m.CloudCalls.WithLabelValues(i.name, op, cloud.ErrorClass(err)).Inc()
	i.m.CloudSeconds.WithLabelValues(i.name, op).Observe(time.Since(start).Seconds())
}

func (i *instrumented) Launch(ctx context.Context, spec cloud.LaunchSpec, n int) ([]cloud.Instance, error) {
	start := time.Now()
	out, err := i.Provider.Launch(ctx, spec, n)
	i.observe("launch", start, err)
	return out, err
}

func (i *instrumented) List(ctx context.Context, tags map[string]string) ([]cloud.Instance, error) {
	start := time.Now()
	out, err := i.Provider.List(ctx, tags)
	i.observe("list", start, err)
	return out, err
}

func (i *instrumented) Terminate(ctx context.Context, ids []string) ([]string, error) {
	start := time.Now()
	out, err := i.Provider.Terminate(ctx, ids)
	i.observe("terminate", start, err)
	return out, err
}

func (i *instrumented) Stop(ctx context.Context, ids []string) ([]string, error) {
	start := time.Now()
	out, err := i.Provider.Stop(ctx, ids)
	i.observe("stop", start, err)
	return out, err
}

func (i *instrumented) Start(ctx context.Context, ids []string) ([]string, error) {
	start := time.Now()
	out, err := i.Provider.Start(ctx, ids)
	i.observe("start", start, err)
	return out, err
}

func (i *instrumented) ConsoleOutput(ctx context.Context, id string) ([]byte, error) {
	start := time.Now()
	out, err := i.Provider.ConsoleOutput(ctx, id)
	i.observe("console_output", start, err)
	return out, err
}
