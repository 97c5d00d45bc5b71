package sim

import (
	"cmp"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Job is one row of a trace: a lease request at Submit (from the trace's
// start) that holds its instance for Duration.
type Job struct {
	Submit   time.Duration
	Duration time.Duration
	Pool     string // "" when the trace has no pool column
	Line     int    // where it is in the trace file
}

// Trace is a parsed trace, its jobs in submit order.
type Trace struct {
	Jobs []Job
	// HasPool says the trace has a pool column.
	HasPool bool
	// Unsorted is the line of the first row submitted before the row
	// above it (0: the rows were in order). Such a trace is sorted, stably
	// by submit_s, and the CLI says so.
	Unsorted int
}

// maxSeconds bounds a trace's times: a century, far below what a
// time.Duration holds.
const maxSeconds = 100 * 365 * 24 * 3600

// ReadTrace parses a trace: CSV with a header naming the columns submit_s
// (seconds from the trace's start) and duration_s, both non-negative
// numbers, and optionally pool. Lines starting with # are comments. Errors
// name the trace and the line.
func ReadTrace(r io.Reader, name string) (Trace, error) {
	cr := csv.NewReader(r)
	cr.Comment = '#'
	cr.ReuseRecord = true
	cr.TrimLeadingSpace = true
	header, err := cr.Read()
	if errors.Is(err, io.EOF) {
		return Trace{}, fmt.Errorf("trace %s: empty; want a header line: submit_s,duration_s[,pool]", name)
	}
	if err != nil {
		return Trace{}, fmt.Errorf("trace %s: %w", name, err)
	}
	submitCol, durationCol, poolCol := -1, -1, -1
	for i, h := range header {
		h = strings.TrimSpace(strings.TrimPrefix(h, "\ufeff"))
		var col *int
		switch h {
		case "submit_s":
			col = &submitCol
		case "duration_s":
			col = &durationCol
		case "pool":
			col = &poolCol
		default:
			return Trace{}, fmt.Errorf("trace %s:1: unknown column %q; the columns are submit_s, duration_s and optionally pool", name, h)
		}
		if *col >= 0 {
			return Trace{}, fmt.Errorf("trace %s:1: column %q twice", name, h)
		}
		*col = i
	}
	if submitCol < 0 || durationCol < 0 {
		return Trace{}, fmt.Errorf("trace %s:1: the header must name submit_s and duration_s (and optionally pool), not %q", name, strings.Join(header, ","))
	}
	t := Trace{HasPool: poolCol >= 0}
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			// csv's errors carry the line already.
			return Trace{}, fmt.Errorf("trace %s: %w", name, err)
		}
		line, _ := cr.FieldPos(0)
		j := Job{Line: line}
		if j.Submit, err = seconds(rec[submitCol]); err != nil {
			return Trace{}, fmt.Errorf("trace %s:%d: submit_s: %w", name, line, err)
		}
		if j.Duration, err = seconds(rec[durationCol]); err != nil {
			return Trace{}, fmt.Errorf("trace %s:%d: duration_s: %w", name, line, err)
		}
		if poolCol >= 0 {
			j.Pool = strings.TrimSpace(rec[poolCol])
			if j.Pool == "" {
				return Trace{}, fmt.Errorf("trace %s:%d: pool is empty", name, line)
			}
		}
		if n := len(t.Jobs); t.Unsorted == 0 && n > 0 && j.Submit < t.Jobs[n-1].Submit {
			t.Unsorted = line
		}
		t.Jobs = append(t.Jobs, j)
	}
	if len(t.Jobs) == 0 {
		return Trace{}, fmt.Errorf("trace %s: no jobs after the header", name)
	}
	if t.Unsorted != 0 {
		slices.SortStableFunc(t.Jobs, func(a, b Job) int { return cmpDuration(a.Submit, b.Submit) })
	}
	return t, nil
}

// seconds parses a non-negative, finite number of seconds.
func seconds(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	f, err := strconv.ParseFloat(s, 64)
	switch {
	case err != nil:
		return 0, fmt.Errorf("%q is not a number", s)
	case math.IsNaN(f) || math.IsInf(f, 0):
		return 0, fmt.Errorf("%q is not a finite number", s)
	case f < 0:
		return 0, fmt.Errorf("%s is negative", s)
	case f > maxSeconds:
		return 0, fmt.Errorf("%s is more than a century", s)
	}
	return time.Duration(math.Round(f * 1e9)), nil
}

func cmpDuration(a, b time.Duration) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Pools returns the pools the trace's jobs go to, sorted ("" for a trace
// without a pool column).
func (t Trace) Pools() []string {
	seen := map[string]bool{}
	for _, j := range t.Jobs {
		seen[j.Pool] = true
	}
	out := make([]string, 0, len(seen))
	for p := range seen {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// Peak is the most jobs of pool that would run at once if each started
// when it was submitted: the instances the trace needs at its busiest.
func (t Trace) Peak(pool string) int {
	type edge struct {
		at    time.Duration
		delta int
	}
	var edges []edge
	for _, j := range t.Jobs {
		if j.Pool == pool {
			edges = append(edges, edge{j.Submit, 1}, edge{j.Submit + j.Duration, -1})
		}
	}
	// Ends before starts at the same moment: an instance freed then is
	// free for a job submitted then.
	slices.SortFunc(edges, func(a, b edge) int { return cmp.Or(cmp.Compare(a.at, b.at), cmp.Compare(a.delta, b.delta)) })
	peak, now := 0, 0
	for _, e := range edges {
		now += e.delta
		peak = max(peak, now)
	}
	return peak
}
