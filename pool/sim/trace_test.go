package sim

import (
	"strings"
	"testing"
	"time"
)

func TestReadTrace(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []Job // Pool and Line checked too
		unsorted int
		err      string
	}{
		{name: "plain", in: "submit_s,duration_s\n0,1.5\n2.25,0\n",
			want: []Job{{0, 1500 * time.Millisecond, "", 2}, {2250 * time.Millisecond, 0, "", 3}}},
		{name: "columns in any order, a pool, comments and spaces", in: "pool, duration_s ,submit_s\n# a comment\nlinux, 60, 5\nmac,1e1,7\n",
			want: []Job{{5 * time.Second, 60 * time.Second, "linux", 3}, {7 * time.Second, 10 * time.Second, "mac", 4}}},
		{name: "unsorted rows are sorted, stably", in: "submit_s,duration_s\n10,1\n5,2\n10,3\n5,4\n",
			want:     []Job{{5 * time.Second, 2 * time.Second, "", 3}, {5 * time.Second, 4 * time.Second, "", 5}, {10 * time.Second, time.Second, "", 2}, {10 * time.Second, 3 * time.Second, "", 4}},
			unsorted: 3},
		{name: "empty", in: "", err: "empty"},
		{name: "header only", in: "submit_s,duration_s\n", err: "no jobs"},
		{name: "no duration column", in: "submit_s,pool\n1,a\n", err: ":1: the header must name submit_s and duration_s"},
		{name: "a column twice", in: "submit_s,duration_s,submit_s\n1,2,3\n", err: `:1: column "submit_s" twice`},
		{name: "negative", in: "submit_s,duration_s\n1,2\n-1,2\n", err: ":3: submit_s: -1 is negative"},
		{name: "infinite", in: "submit_s,duration_s\n1,Inf\n", err: `:2: duration_s: "Inf" is not a finite number`},
		{name: "not a number", in: "submit_s,duration_s\n1,2\n\n3,x\n", err: `:4: duration_s: "x" is not a number`},
		{name: "too few fields", in: "submit_s,duration_s\n1\n", err: "line 2"},
		{name: "empty pool", in: "submit_s,duration_s,pool\n1,2,\n", err: ":2: pool is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ReadTrace(strings.NewReader(tc.in), "t.csv")
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Jobs) != len(tc.want) || got.Unsorted != tc.unsorted {
				t.Fatalf("got %+v, want jobs %+v, unsorted at %d", got, tc.want, tc.unsorted)
			}
			for i := range tc.want {
				if got.Jobs[i] != tc.want[i] {
					t.Errorf("job %d = %+v, want %+v", i, got.Jobs[i], tc.want[i])
				}
			}
		})
	}
}

func TestReadBootDist(t *testing.T) {
	got, err := ReadBootDist(strings.NewReader("boot_s\n# observed\n58\n\n61.5\n"), "b")
	if err != nil || len(got) != 2 || got[0] != 58*time.Second || got[1] != 61500*time.Millisecond {
		t.Errorf("got %v, %v; want 58s and 61.5s", got, err)
	}
	for in, want := range map[string]string{
		"":               "no boot times",
		"60\nsoon\n":     `b:2: "soon" is not a number`,
		"60\n-5\n":       "b:2: -5 is negative",
		"boot_s\n0\n":    "b:2: a boot takes some time",
		"# only words\n": "no boot times",
	} {
		if _, err := ReadBootDist(strings.NewReader(in), "b"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want one containing %q", in, err, want)
		}
	}
}

func TestPeak(t *testing.T) {
	s := time.Second
	tr := Trace{Jobs: []Job{
		{Submit: 0, Duration: 10 * s, Pool: "a"},
		{Submit: 5 * s, Duration: 10 * s, Pool: "a"},
		{Submit: 10 * s, Duration: 1 * s, Pool: "a"}, // starts as the first ends
		{Submit: 6 * s, Duration: 1 * s, Pool: "b"},
	}}
	for pool, want := range map[string]int{"a": 2, "b": 1, "c": 0} {
		if got := tr.Peak(pool); got != want {
			t.Errorf("Peak(%q) = %d, want %d", pool, got, want)
		}
	}
}
