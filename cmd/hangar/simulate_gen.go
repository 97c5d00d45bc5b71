package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/hangar-ci/hangar/pool/sim"
	"github.com/spf13/cobra"
)

// simulateGenCmd is `hangar simulate gen`: a synthetic trace for
// `hangar simulate`, from the model documented at sim.GenOptions.
func simulateGenCmd(g *globals) *cobra.Command {
	o := sim.DefaultGenOptions()
	var out, pools string
	cmd := &cobra.Command{
		Use:   "gen",
		Short: "Write a synthetic CI trace: pushes with a daily and weekly rhythm, fanned out to matrices of jobs",
		Long: `Write a synthetic trace (submit_s,duration_s[,pool]) for hangar simulate.

Pushes arrive as a Poisson process whose rate follows the working day
(a hump between --work-start and --work-end, local time, peaking at
--peak-pushes-per-hour; --night-factor of that outside it) and the week
(--weekend-factor on Saturday and Sunday). Each push runs one job with
probability --single-job, else a matrix of --matrix-min to --matrix-max
jobs, submitted within --spread of each other. Durations are lognormal
(--median, --sigma). Second 0 is Monday 00:00 UTC.

The defaults are a mid-size team: about 1,360 pushes and 7,000 jobs a
week. The same flags and --seed give the same bytes.`,
		Example: `  hangar simulate gen --days 7 --seed 1 -o pool/sim/traces/synthetic.csv
  hangar simulate gen --days 28 --peak-pushes-per-hour 120 --pools linux=0.7,windows=0.2,macos=0.1 | gzip > big.csv.gz`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if o.Pools, err = parsePoolShares(pools); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			if out == "" || out == "-" {
				return sim.Generate(o, g.stdout)
			}
			return writeTraceFile(out, o)
		},
	}
	f := cmd.Flags()
	// -o names the file here, as in gzip -o or sort -o, shadowing the
	// global -o table|json: a trace has only one format.
	f.StringVarP(&out, "output", "o", "", "write the trace to this file (default: standard output)")
	f.Uint64Var(&o.Seed, "seed", o.Seed, "random seed")
	f.Float64Var(&o.Days, "days", o.Days, "length of the trace in days")
	f.Float64Var(&o.PeakPushesPerHour, "peak-pushes-per-hour", o.PeakPushesPerHour, "arrival rate of pushes at the working day's peak")
	f.Float64Var(&o.NightFactor, "night-factor", o.NightFactor, "rate outside working hours, as a fraction of the peak")
	f.Float64Var(&o.WeekendFactor, "weekend-factor", o.WeekendFactor, "rate on Saturday and Sunday, as a fraction of a weekday's")
	f.Float64Var(&o.WorkStartHour, "work-start", o.WorkStartHour, "local hour the working day starts")
	f.Float64Var(&o.WorkEndHour, "work-end", o.WorkEndHour, "local hour the working day ends")
	f.DurationVar(&o.UTCOffset, "utc-offset", o.UTCOffset, "local time minus UTC, e.g. -5h or 5h30m")
	f.Float64Var(&o.SingleJobProb, "single-job", o.SingleJobProb, "probability that a push runs one job rather than a matrix")
	f.IntVar(&o.MatrixMin, "matrix-min", o.MatrixMin, "fewest jobs in a matrix")
	f.IntVar(&o.MatrixMax, "matrix-max", o.MatrixMax, "most jobs in a matrix")
	f.DurationVar(&o.Spread, "spread", o.Spread, "submit a matrix's jobs within this time of the push (0: together)")
	f.DurationVar(&o.MedianDuration, "median", o.MedianDuration, "median job duration")
	f.Float64Var(&o.Sigma, "sigma", o.Sigma, "lognormal sigma of job durations (0: all take the median)")
	f.StringVar(&pools, "pools", "", "a pool column: NAME=WEIGHT,… e.g. linux=0.7,windows=0.2,macos=0.1")
	return cmd
}

// parsePoolShares reads --pools: NAME=WEIGHT pairs separated by commas; a
// NAME alone weighs 1.
func parsePoolShares(s string) ([]sim.PoolShare, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var shares []sim.PoolShare
	for item := range strings.SplitSeq(s, ",") {
		name, weight, hasWeight := strings.Cut(strings.TrimSpace(item), "=")
		p := sim.PoolShare{Name: strings.TrimSpace(name), Weight: 1}
		if hasWeight {
			w, err := strconv.ParseFloat(strings.TrimSpace(weight), 64)
			if err != nil {
				return nil, fmt.Errorf("--pools: weight of %q is not a number: %q", p.Name, weight)
			}
			p.Weight = w
		}
		shares = append(shares, p)
	}
	return shares, nil
}

// writeTraceFile writes the trace beside path and renames it into place,
// so that a failed run leaves no half a trace under the name.
func writeTraceFile(path string, o sim.GenOptions) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".trace-*.csv")
	if err != nil {
		return fmt.Errorf("writing trace to %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			_ = os.Remove(tmp.Name()) // the write's error is the one to report
		}
	}()
	if err := sim.Generate(o, tmp); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("writing trace to %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing trace to %s: %w", path, err)
	}
	// CreateTemp makes the file 0600; a trace is not a secret.
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("writing trace to %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing trace to %s: %w", path, err)
	}
	return nil
}
