package sim

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"
)

// GenOptions describes the synthetic load that Generate writes: bursty CI
// traffic of one team, as pushes that each fan out to a matrix of jobs.
//
// The model: pushes arrive as a non-homogeneous Poisson process. Its rate, in pushes per hour, at a
// moment whose local hour of day is h on weekday d, is
//
//	PeakPushesPerHour × week(d) × (NightFactor + (1−NightFactor) × hump(h))
//	hump(h) = sin²(π (h−WorkStartHour) / (WorkEndHour−WorkStartHour)) within working hours, else 0
//	week(d) = WeekendFactor on Saturday and Sunday, else 1
//
// so the rate is PeakPushesPerHour in the middle of a working day and
// NightFactor of that at night. Second 0 of the trace is Monday 00:00 UTC;
// local time is UTC + UTCOffset. Then:
//
//   - Each push is one job with probability SingleJobProb (a lint or docs
//     workflow), else a matrix of MatrixMin to MatrixMax jobs, uniformly.
//   - Each job of a push is submitted at the push's moment plus a uniform
//     delay in [0, Spread]; with Spread 0 the matrix is submitted at once.
//   - Each job runs for a lognormal duration, MedianDuration × e^(Sigma·Z)
//     with Z standard normal, independently of the others.
//   - With Pools, each job goes to one pool, drawn by weight.
//
// Arrivals, fan-out and durations come from three random streams derived
// from Seed, so changing the durations' parameters leaves the submit times
// as they were, and a comparison of two settings sees the same pushes.
type GenOptions struct {
	Seed uint64
	// Days is the trace's length; pushes arrive in [0, Days×24h).
	Days float64

	PeakPushesPerHour float64
	// NightFactor is the rate outside working hours as a fraction of the
	// peak: scheduled builds, bots, colleagues in other time zones.
	NightFactor float64
	// WeekendFactor scales the whole day's rate on Saturday and Sunday.
	WeekendFactor float64
	// WorkStartHour and WorkEndHour bound the working day's hump, in local
	// hours (0–24); the rate peaks half-way between them.
	WorkStartHour, WorkEndHour float64
	// UTCOffset is the team's local time minus UTC (e.g. -5h for New
	// York in winter): a fixed offset, so no time zone database and no
	// daylight saving time make the output depend on the machine.
	UTCOffset time.Duration

	SingleJobProb        float64
	MatrixMin, MatrixMax int
	Spread               time.Duration

	MedianDuration time.Duration
	Sigma          float64

	// Pools, when not empty, adds a pool column: each job's pool is drawn
	// with probability proportional to its Weight.
	Pools []PoolShare
}

// PoolShare is one pool of a generated trace and its share of the jobs.
type PoolShare struct {
	Name   string
	Weight float64
}

// DefaultGenOptions returns the load of a mid-size team, about sixty
// engineers pushing four or five times a working day:
//
//   - 40 pushes an hour at the early-afternoon peak (working hours 8–19
//     local, UTC), 5% of that at night, 15% on weekends. That makes about
//     257 pushes on a weekday and 1,360 a week.
//   - 30% of the pushes run a single job; the rest a matrix of 2–12 jobs
//     (operating systems × language versions), submitted together as GitHub
//     Actions and Buildbot's schedulers do: 5.2 jobs a push on average,
//     about 7,000 jobs a week.
//   - Jobs take 6 minutes at the median with σ 0.8: p95 22 minutes, p99 39,
//     mean 8.3, so about 30 instances are busy at the peak.
//
// Seed 1, 7 days: the week of pool/sim/traces/synthetic.csv.
func DefaultGenOptions() GenOptions {
	return GenOptions{
		Seed:              1,
		Days:              7,
		PeakPushesPerHour: 40,
		NightFactor:       0.05,
		WeekendFactor:     0.15,
		WorkStartHour:     8,
		WorkEndHour:       19,
		SingleJobProb:     0.3,
		MatrixMin:         2,
		MatrixMax:         12,
		MedianDuration:    6 * time.Minute,
		Sigma:             0.8,
	}
}

// maxGenDays keeps a typo from filling a disk: ten years of the defaults
// are already some 3.6 million jobs.
const maxGenDays = 3660

// Validate reports every problem with the options at once.
func (o GenOptions) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	finite := func(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }
	if !finite(o.Days) || o.Days <= 0 || o.Days > maxGenDays {
		bad("days must be more than 0 and at most %d, not %v", maxGenDays, o.Days)
	}
	if !finite(o.PeakPushesPerHour) || o.PeakPushesPerHour <= 0 {
		bad("peak pushes per hour must be more than 0, not %v", o.PeakPushesPerHour)
	}
	if !finite(o.NightFactor) || o.NightFactor < 0 || o.NightFactor > 1 {
		bad("night factor must be between 0 and 1, not %v", o.NightFactor)
	}
	if !finite(o.WeekendFactor) || o.WeekendFactor < 0 || o.WeekendFactor > 1 {
		bad("weekend factor must be between 0 and 1, not %v", o.WeekendFactor)
	}
	if !finite(o.WorkStartHour) || !finite(o.WorkEndHour) || o.WorkStartHour < 0 || o.WorkEndHour > 24 || o.WorkStartHour >= o.WorkEndHour {
		bad("working hours must satisfy 0 <= start < end <= 24, not %v–%v", o.WorkStartHour, o.WorkEndHour)
	}
	if o.UTCOffset < -14*time.Hour || o.UTCOffset > 14*time.Hour {
		bad("UTC offset must be between -14h and +14h, not %v", o.UTCOffset)
	}
	if !finite(o.SingleJobProb) || o.SingleJobProb < 0 || o.SingleJobProb > 1 {
		bad("single-job probability must be between 0 and 1, not %v", o.SingleJobProb)
	}
	if o.MatrixMin < 1 || o.MatrixMax < o.MatrixMin || o.MatrixMax > 1000 {
		bad("matrix size must satisfy 1 <= min <= max <= 1000, not %d–%d", o.MatrixMin, o.MatrixMax)
	}
	if o.Spread < 0 {
		bad("spread must not be negative, not %v", o.Spread)
	}
	if o.MedianDuration <= 0 {
		bad("median duration must be more than 0, not %v", o.MedianDuration)
	}
	// σ 5 already puts p99 at 100,000 times the median.
	if !finite(o.Sigma) || o.Sigma < 0 || o.Sigma > 5 {
		bad("sigma must be between 0 and 5, not %v", o.Sigma)
	}
	seen := map[string]bool{}
	for i, p := range o.Pools {
		switch {
		case p.Name == "":
			bad("pool %d has no name", i+1)
		case strings.ContainsAny(p.Name, ",\"\r\n") || strings.TrimSpace(p.Name) != p.Name:
			// The trace is CSV without quoting.
			bad("pool name %q must not contain commas, quotes, line breaks or surrounding spaces", p.Name)
		case seen[p.Name]:
			bad("pool %q is named twice", p.Name)
		}
		seen[p.Name] = true
		if !finite(p.Weight) || p.Weight <= 0 {
			bad("pool %q: weight must be more than 0, not %v", p.Name, p.Weight)
		}
	}
	return errors.Join(errs...)
}

// pushRate is the model's arrival rate, in pushes per hour, at second t of
// the trace.
func (o GenOptions) pushRate(t float64) float64 {
	local := t + o.UTCOffset.Seconds()
	day := math.Floor(local / 86400)
	hour := (local - day*86400) / 3600
	// Day 0 is a Monday; Saturday and Sunday are days 5 and 6 of a week.
	week := 1.0
	if wd := int(day) % 7; wd == 5 || wd == 6 || wd == -1 || wd == -2 {
		week = o.WeekendFactor
	}
	hump := 0.0
	if hour > o.WorkStartHour && hour < o.WorkEndHour {
		s := math.Sin(math.Pi * (hour - o.WorkStartHour) / (o.WorkEndHour - o.WorkStartHour))
		hump = s * s
	}
	return o.PeakPushesPerHour * week * (o.NightFactor + (1-o.NightFactor)*hump)
}

// genJob is one row of a generated trace.
type genJob struct {
	submit, duration float64
	pool             int
}

// Generate writes a trace of o's model to w: CSV with the header
// submit_s,duration_s (and pool, with Pools), one row per job, sorted by
// submit_s, seconds with fixed decimals. The same options give the same
// bytes.
func Generate(o GenOptions, w io.Writer) error {
	if err := o.Validate(); err != nil {
		return fmt.Errorf("generating a trace: %w", err)
	}
	jobs := o.jobs()
	bw := bufio.NewWriterSize(w, 64<<10)
	header := "submit_s,duration_s\n"
	if len(o.Pools) > 0 {
		header = "submit_s,duration_s,pool\n"
	}
	if _, err := bw.WriteString(header); err != nil {
		return fmt.Errorf("writing trace: %w", err)
	}
	line := make([]byte, 0, 64)
	for _, j := range jobs {
		// Milliseconds keep pushes apart; tenths of a second are plenty
		// for durations of minutes.
		line = strconv.AppendFloat(line[:0], j.submit, 'f', 3, 64)
		line = append(line, ',')
		line = strconv.AppendFloat(line, j.duration, 'f', 1, 64)
		if len(o.Pools) > 0 {
			line = append(line, ',')
			line = append(line, o.Pools[j.pool].Name...)
		}
		line = append(line, '\n')
		if _, err := bw.Write(line); err != nil {
			return fmt.Errorf("writing trace: %w", err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("writing trace: %w", err)
	}
	return nil
}

// jobs draws the trace's jobs, sorted by submit time.
func (o GenOptions) jobs() []genJob {
	arrivals := newStream(o.Seed, 1)
	fanout := newStream(o.Seed, 2)
	durations := newStream(o.Seed, 3)

	end := o.Days * 86400
	// Thinning (Lewis and Shedler): candidates at the peak rate, each kept
	// with probability rate/peak. The peak is the rate's maximum since
	// both factors are at most 1.
	peakPerSecond := o.PeakPushesPerHour / 3600
	var total float64
	for _, p := range o.Pools {
		total += p.Weight
	}
	var jobs []genJob
	for t := arrivals.exp() / peakPerSecond; t < end; t += arrivals.exp() / peakPerSecond {
		if arrivals.float()*o.PeakPushesPerHour >= o.pushRate(t) {
			continue
		}
		n := 1
		if fanout.float() >= o.SingleJobProb {
			n = o.MatrixMin + fanout.intn(o.MatrixMax-o.MatrixMin+1)
		}
		for range n {
			j := genJob{submit: t}
			if o.Spread > 0 {
				j.submit += fanout.float() * o.Spread.Seconds()
			}
			if len(o.Pools) > 0 {
				j.pool = pickPool(o.Pools, total, fanout.float())
			}
			j.duration = o.MedianDuration.Seconds() * math.Exp(o.Sigma*durations.normal())
			// A row of 0.0 would read as a job that takes no time;
			// a lognormal gets there only with absurd σ.
			j.duration = max(j.duration, 0.1)
			jobs = append(jobs, j)
		}
	}
	// Spread can carry one push's jobs past the next push's; stable, so
	// equal moments keep the order they were drawn in.
	slices.SortStableFunc(jobs, func(a, b genJob) int {
		switch {
		case a.submit < b.submit:
			return -1
		case a.submit > b.submit:
			return 1
		}
		return 0
	})
	return jobs
}

func pickPool(pools []PoolShare, total, u float64) int {
	x := u * total
	for i, p := range pools {
		if x < p.Weight {
			return i
		}
		x -= p.Weight
	}
	return len(pools) - 1 // rounding at the top end
}

// stream is a seeded random source whose draws are computed here from the
// PCG's 64-bit outputs (a specified algorithm), rather than by math/rand's
// helpers, whose algorithms a Go release may change: the shipped synthetic
// trace must stay what the generator writes.
type stream struct{ pcg *rand.PCG }

func newStream(seed, id uint64) stream {
	return stream{rand.NewPCG(splitmix(seed^splitmix(id)), splitmix(seed+id))}
}

// splitmix is SplitMix64's finalizer: it spreads nearby seeds (1, 2, 3)
// over the whole state space.
func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// float is uniform in [0, 1).
func (s stream) float() float64 { return float64(s.pcg.Uint64()>>11) / (1 << 53) }

// exp is exponential with mean 1.
func (s stream) exp() float64 { return -math.Log(1 - s.float()) }

// intn is uniform in [0, n).
func (s stream) intn(n int) int { return min(int(s.float()*float64(n)), n-1) }

// normal is standard normal (Box–Muller, one of the pair).
func (s stream) normal() float64 {
	u1, u2 := 1-s.float(), s.float()
	return math.Sqrt(-2*math.Log(u1)) * math.Cos(2*math.Pi*u2)
}
