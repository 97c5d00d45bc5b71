package sim

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"
)

// Report is a simulation's outcome, as `hangar simulate -o json` prints
// it; scripts rely on its names.
type Report struct {
	Jobs     int            `json:"jobs"`
	BootS    float64        `json:"boot_s"`
	Oracle   OracleReport   `json:"oracle"`
	Policies []PolicyReport `json:"policies"`
}

// OracleReport is the clairvoyant schedule's cost (Oracle), summed over
// the pools.
type OracleReport struct {
	InstanceHours float64 `json:"instance_hours"`
}

// PolicyReport is one policy's line.
type PolicyReport struct {
	Name          string   `json:"name"` // on-demand, config, auto or grid
	MinIdle       *int     `json:"min_idle"`
	IdleTTDS      *float64 `json:"idle_ttd_s"`
	WaitP50S      float64  `json:"wait_p50_s"`
	WaitP95S      float64  `json:"wait_p95_s"`
	WaitP99S      float64  `json:"wait_p99_s"`
	WaitMaxS      float64  `json:"wait_max_s"`
	InstanceHours float64  `json:"instance_hours"`
	IdleHours     float64  `json:"idle_hours"`
	BootHours     float64  `json:"boot_hours"`
	Launches      int      `json:"launches"`
	// VsOracle is InstanceHours over the oracle's; P95VsOnDemand, the p95
	// wait over on-demand's (null without an on-demand run, or when its
	// p95 is 0).
	VsOracle      float64  `json:"instance_hours_vs_oracle"`
	P95VsOnDemand *float64 `json:"wait_p95_vs_on_demand"`
	// Pareto, with --grid: no grid point has both fewer instance-hours and
	// a shorter p95 wait (for a grid point: it is on the frontier).
	Pareto *bool `json:"pareto,omitempty"`
}

// GridMinIdle and GridIdleTTD are the fixed settings --grid sweeps: from
// no spares to more than most pools keep, and from reaping at once to
// Jenkins's 30 minutes and beyond. Roughly doubling steps, since costs
// and waits change with the order of magnitude, not the unit.
var (
	GridMinIdle = []int{0, 1, 2, 4, 8, 16}
	GridIdleTTD = []time.Duration{0, time.Minute, 5 * time.Minute, 15 * time.Minute, 30 * time.Minute, time.Hour}
)

// Grid is the fixed policies --grid sweeps; points with a min_idle above
// a pool's max_instances are left out.
func Grid(o Options) []Policy {
	limit := math.MaxInt
	for _, s := range o.Pools {
		limit = min(limit, s.MaxInstances)
	}
	var out []Policy
	for _, n := range GridMinIdle {
		if n > limit {
			continue
		}
		for _, ttd := range GridIdleTTD {
			out = append(out, Fixed(n, ttd))
		}
	}
	return out
}

// Run simulates trace under each policy, the runs in parallel (each is
// single-threaded and independent), and reports them in the order given.
func Run(ctx context.Context, trace Trace, o Options, policies []Policy) (Report, error) {
	rep := Report{Jobs: len(trace.Jobs), BootS: round(o.Boot.Mean().Seconds(), 3)}
	byPool := map[string][]Job{}
	for _, j := range trace.Jobs {
		byPool[j.Pool] = append(byPool[j.Pool], j)
	}
	var oracle time.Duration
	for _, jobs := range byPool {
		oracle += Oracle(jobs, o.Boot.Mean())
	}
	rep.Oracle.InstanceHours = hours(oracle)

	results := make([]Result, len(policies))
	errs := make([]error, len(policies))
	var done atomic.Int64
	total := len(trace.Jobs) * len(policies)
	work := make(chan int)
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), len(policies)) {
		wg.Go(func() {
			for i := range work {
				ro := o
				last := 0
				if o.Progress != nil {
					ro.Progress = func(n, _ int) {
						o.Progress(int(done.Add(int64(n-last))), total)
						last = n
					}
				}
				results[i], errs[i] = Simulate(ctx, trace.Jobs, ro, policies[i])
			}
		})
	}
	for i := range policies {
		work <- i
	}
	close(work)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return Report{}, err
		}
	}

	var onDemandP95 *time.Duration
	for _, r := range results {
		if r.Policy == "on-demand" {
			onDemandP95 = &r.WaitP95
		}
	}
	for _, r := range results {
		p := PolicyReport{
			Name: r.Policy, MinIdle: r.MinIdle,
			WaitP50S: secs(r.WaitP50), WaitP95S: secs(r.WaitP95), WaitP99S: secs(r.WaitP99), WaitMaxS: secs(r.WaitMax),
			InstanceHours: hours(r.InstanceTime), IdleHours: hours(r.IdleTime), BootHours: hours(r.BootTime),
			Launches: r.Launches,
		}
		if r.IdleTTD != nil {
			s := secs(*r.IdleTTD)
			p.IdleTTDS = &s
		}
		if oracle > 0 {
			p.VsOracle = round(float64(r.InstanceTime)/float64(oracle), 3)
		}
		if onDemandP95 != nil && *onDemandP95 > 0 {
			v := round(float64(r.WaitP95)/float64(*onDemandP95), 3)
			p.P95VsOnDemand = &v
		}
		rep.Policies = append(rep.Policies, p)
	}
	markPareto(rep.Policies)
	return rep, nil
}

// markPareto sets Pareto on every policy when there are grid points.
func markPareto(ps []PolicyReport) {
	var grid []PolicyReport
	for _, p := range ps {
		if p.Name == "grid" {
			grid = append(grid, p)
		}
	}
	if len(grid) == 0 {
		return
	}
	for i := range ps {
		on := true
		for _, g := range grid {
			if dominates(g, ps[i]) {
				on = false
				break
			}
		}
		ps[i].Pareto = &on
	}
}

// dominates: a is no worse than b on both counts and better on one.
func dominates(a, b PolicyReport) bool {
	return a.InstanceHours <= b.InstanceHours && a.WaitP95S <= b.WaitP95S &&
		(a.InstanceHours < b.InstanceHours || a.WaitP95S < b.WaitP95S)
}

func secs(d time.Duration) float64  { return round(d.Seconds(), 3) }
func hours(d time.Duration) float64 { return round(d.Hours(), 4) }

// round keeps d decimals, so that the report says what is meaningful and
// prints the same everywhere.
func round(x float64, d int) float64 {
	p := math.Pow(10, float64(d))
	return math.Round(x*p) / p
}

// WriteJSON prints the report as one JSON object.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

var csvHeader = []string{"name", "min_idle", "idle_ttd_s", "wait_p50_s", "wait_p95_s", "wait_p99_s", "wait_max_s",
	"instance_hours", "idle_hours", "boot_hours", "launches", "instance_hours_vs_oracle", "wait_p95_vs_on_demand", "pareto",
	"jobs", "boot_s", "oracle_instance_hours"}

// WriteCSV prints one row a policy, with the report's totals on every row.
func (r Report) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(csvHeader); err != nil {
		return err
	}
	for _, p := range r.Policies {
		row := []string{p.Name, optInt(p.MinIdle), optFloat(p.IdleTTDS), num(p.WaitP50S), num(p.WaitP95S), num(p.WaitP99S), num(p.WaitMaxS),
			num(p.InstanceHours), num(p.IdleHours), num(p.BootHours), strconv.Itoa(p.Launches), num(p.VsOracle), optFloat(p.P95VsOnDemand), optBool(p.Pareto),
			strconv.Itoa(r.Jobs), num(r.BootS), num(r.Oracle.InstanceHours)}
		if err := cw.Write(row); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}

func num(f float64) string { return strconv.FormatFloat(f, 'f', -1, 64) }

func optInt(p *int) string {
	if p == nil {
		return ""
	}
	return strconv.Itoa(*p)
}

func optFloat(p *float64) string {
	if p == nil {
		return ""
	}
	return num(*p)
}

func optBool(p *bool) string {
	if p == nil {
		return ""
	}
	return strconv.FormatBool(*p)
}

// WriteTable prints the report for a person: the named policies, then,
// with a grid, its Pareto frontier only.
func (r Report) WriteTable(w io.Writer) error {
	if _, err := fmt.Fprintf(w, "%d jobs, boot %ss; oracle (clairvoyant, zero wait): %s instance-hours\n\n", r.Jobs, num(r.BootS), num(r.Oracle.InstanceHours)); err != nil {
		return err
	}
	var named, grid, front []PolicyReport
	for _, p := range r.Policies {
		switch {
		case p.Name != "grid":
			named = append(named, p)
		case p.Pareto != nil && *p.Pareto:
			front = append(front, p)
			fallthrough
		default:
			grid = append(grid, p)
		}
	}
	if err := writeRows(w, named); err != nil {
		return err
	}
	if len(grid) == 0 {
		return nil
	}
	if _, err := fmt.Fprintf(w, "\nPareto frontier of the grid (%d of %d fixed min_idle × idle_ttd points; instance-hours vs p95 wait):\n", len(front), len(grid)); err != nil {
		return err
	}
	sortByCost(front)
	if err := writeRows(w, front); err != nil {
		return err
	}
	for _, p := range named {
		verdict := "on or beyond the grid's frontier"
		if !*p.Pareto {
			verdict = "dominated by a fixed grid point (fewer instance-hours and a shorter p95 wait)"
		}
		if _, err := fmt.Fprintf(w, "%s: %s\n", p.Name, verdict); err != nil {
			return err
		}
	}
	return nil
}

func writeRows(w io.Writer, ps []PolicyReport) error {
	var b strings.Builder
	b.WriteString("POLICY\tMIN_IDLE\tIDLE_TTD\tWAIT_P50\tWAIT_P95\tWAIT_P99\tWAIT_MAX\tINSTANCE_H\tIDLE_H\tBOOT_H\tLAUNCHES\tVS_ORACLE\tP95_VS_ON_DEMAND\n")
	for _, p := range ps {
		ttd, minIdle, vsOD := "auto", "auto", "-"
		if p.IdleTTDS != nil {
			ttd = fmtSeconds(*p.IdleTTDS)
		}
		if p.MinIdle != nil {
			minIdle = strconv.Itoa(*p.MinIdle)
		}
		if p.P95VsOnDemand != nil {
			vsOD = fmt.Sprintf("%.3f", *p.P95VsOnDemand)
		}
		fmt.Fprintf(&b, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.3f\t%.3f\t%.3f\t%d\t%.3f\t%s\n", p.Name, minIdle, ttd,
			fmtSeconds(p.WaitP50S), fmtSeconds(p.WaitP95S), fmtSeconds(p.WaitP99S), fmtSeconds(p.WaitMaxS),
			p.InstanceHours, p.IdleHours, p.BootHours, p.Launches, p.VsOracle, vsOD)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if _, err := io.WriteString(tw, b.String()); err != nil {
		return err
	}
	return tw.Flush()
}

func sortByCost(ps []PolicyReport) {
	for i := 1; i < len(ps); i++ {
		for j := i; j > 0 && ps[j].InstanceHours < ps[j-1].InstanceHours; j-- {
			ps[j], ps[j-1] = ps[j-1], ps[j]
		}
	}
}

// fmtSeconds is a duration for a table: whole minutes as such, else
// seconds with a decimal.
func fmtSeconds(s float64) string {
	switch {
	case s == 0:
		return "0s"
	case s >= 60 && math.Mod(s, 60) == 0:
		return strconv.Itoa(int(s/60)) + "m"
	}
	return strconv.FormatFloat(s, 'f', 1, 64) + "s"
}
