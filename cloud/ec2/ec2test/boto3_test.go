package ec2test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// Debian's Python, with Debian's python3-boto3; not whatever python3 comes
// first on PATH.
const python = "/usr/bin/python3"

// botoEnv is the whole environment boto3 runs with: dummy credentials, no
// config or credential files, no instance metadata and no proxy, so that
// nothing can reach or sign for real AWS.
func botoEnv(t *testing.T) []string {
	home := t.TempDir()
	return []string{
		"PATH=/usr/bin:/bin",
		"HOME=" + home,
		"AWS_ACCESS_KEY_ID=AKIDEC2TEST",
		"AWS_SECRET_ACCESS_KEY=ec2test-secret",
		"AWS_DEFAULT_REGION=us-east-1",
		"AWS_CONFIG_FILE=" + os.DevNull,
		"AWS_SHARED_CREDENTIALS_FILE=" + os.DevNull,
		"AWS_EC2_METADATA_DISABLED=true",
		"NO_PROXY=*",
		"PYTHONNOUSERSITE=1",
		"PYTHONDONTWRITEBYTECODE=1",
	}
}

func TestBoto3(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat(python); err != nil {
		t.Skip("no " + python)
	}
	if err := exec.Command(python, "-c", "import boto3").Run(); err != nil {
		t.Skip("boto3 is not importable by " + python + " (apt-get install python3-boto3)")
	}
	s := newServer(t, Options{})
	s.AddImage(Image{ID: "ami-0aaaaaaaaaaaaaaa1", Name: "hangar-worker-2026-01", Owner: "123456789012", Created: time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC)})
	s.AddImage(Image{ID: "ami-0aaaaaaaaaaaaaaa2", Name: "hangar-worker-2026-02", Owner: "123456789012", Created: time.Date(2026, 2, 5, 0, 0, 0, 0, time.UTC), RootVolumeGB: 12})
	s.AddImage(Image{ID: "ami-0aaaaaaaaaaaaaaa3", Name: "hangar-worker-2026-03", Owner: "999999999999"})
	s.SetCapacity(func(typ, _, _ string) string {
		if typ == "x2iedn.32xlarge" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	s.Throttle("DescribeAvailabilityZones", 0.5) // the second call is throttled

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "testdata/boto3_smoke.py", s.URL())
	cmd.Env = botoEnv(t)
	cmd.Dir = "."
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	stdout, err := cmd.Output()
	if err != nil {
		t.Fatalf("boto3 script: %v\n%s", err, stderr.String())
	}
	t.Logf("boto3 script ran in %v; calls %v; errors %v", time.Since(start), s.Calls(), s.Errors())

	type clientError struct {
		Code, Message string
		Status        int
	}
	var got struct {
		Run struct {
			IDs          []string
			Reservation  string
			State, Zone  string
			LaunchTimeTZ float64 `json:"launch_time_tz"`
			Tags         map[string]string
			HTTPTokens   string `json:"http_tokens"`
			HopLimit     int    `json:"hop_limit"`
			ProfileArn   string `json:"profile_arn"`
			PrivateIP    string `json:"private_ip"`
		}
		RerunIDs    []string `json:"rerun_ids"`
		Pages       [][]string
		Console     string
		UserData    string `json:"user_data"`
		Tagged      []string
		Stop        [][]string
		Start       [][]string
		Terminate   [][]string
		Images      []string
		NewestImage string `json:"newest_image"`
		ImageRoot   []any  `json:"image_root"`
		Zones       []string
		Errors      map[string]clientError
	}
	if err := json.Unmarshal(stdout, &got); err != nil {
		t.Fatalf("reading the script's JSON: %v\n%s", err, stdout)
	}

	ids := got.Run.IDs
	if len(ids) != 12 || got.Run.State != "pending" || got.Run.Zone != "us-east-1b" || got.Run.LaunchTimeTZ != 0 ||
		got.Run.Tags["hangar:pool"] != "boto" || got.Run.HTTPTokens != "required" || got.Run.HopLimit != 1 ||
		got.Run.ProfileArn != "arn:aws:iam::123456789012:instance-profile/hangar-worker" || got.Run.PrivateIP == "" {
		t.Errorf("run_instances as boto3 read it: %+v", got.Run)
	}
	if !slices.Equal(got.RerunIDs, ids) || s.Launches("boto-intent-1") != 1 {
		t.Errorf("repeat with the same ClientToken returned %v (launches %d), want %v once", got.RerunIDs, s.Launches("boto-intent-1"), ids)
	}
	var paged []string
	for _, p := range got.Pages {
		if len(p) > 5 {
			t.Errorf("page of %d with PageSize 5", len(p))
		}
		paged = append(paged, p...)
	}
	if len(got.Pages) != 3 || !slices.Equal(paged, ids) {
		t.Errorf("paginator pages %v, want 3 pages holding %v", got.Pages, ids)
	}
	if !strings.Contains(got.Console, ids[0]) {
		t.Errorf("console output %q does not name the instance", got.Console)
	}
	if got.UserData != "#!/bin/bash\necho hello from boto3\n" {
		t.Errorf("user-data round trip: %q", got.UserData)
	}
	if !slices.Equal(got.Tagged, ids[:1]) {
		t.Errorf("tag-key filter after create_tags: %v", got.Tagged)
	}
	wantChanges := func(name string, have [][]string, want ...[]string) {
		if !slices.EqualFunc(have, want, slices.Equal) {
			t.Errorf("%s: %v, want %v", name, have, want)
		}
	}
	wantChanges("stop", got.Stop, []string{ids[1], "running", "stopping"})
	wantChanges("start", got.Start, []string{ids[1], "stopped", "pending"})
	if len(got.Terminate) != 12 || got.Terminate[0][2] != "shutting-down" {
		t.Errorf("terminate: %v", got.Terminate)
	}
	if !slices.Equal(got.Images, []string{"ami-0aaaaaaaaaaaaaaa1", "ami-0aaaaaaaaaaaaaaa2"}) || got.NewestImage != "ami-0aaaaaaaaaaaaaaa2" ||
		len(got.ImageRoot) != 2 || got.ImageRoot[0] != "/dev/xvda" || got.ImageRoot[1] != 12.0 {
		t.Errorf("images %v newest %s root %v", got.Images, got.NewestImage, got.ImageRoot)
	}
	if !slices.Equal(got.Zones, []string{"us-east-1a", "us-east-1b", "us-east-1c"}) {
		t.Errorf("zones %v", got.Zones)
	}
	for name, want := range map[string]clientError{
		"unknown_id": {"InvalidInstanceID.NotFound", "The instance IDs 'i-0000000000000000a, i-0000000000000000b' do not exist", 400},
		"mismatch":   {"IdempotentParameterMismatch", "", 400},
		"user_data":  {"InvalidParameterValue", "User data is limited to 16384 bytes", 400},
		"capacity":   {"InsufficientInstanceCapacity", "", 500},
		"throttled":  {"RequestLimitExceeded", "Request limit exceeded.", 503},
		"page_size":  {"InvalidParameterValue", "", 400},
	} {
		have := got.Errors[name]
		if have.Code != want.Code || have.Status != want.Status || want.Message != "" && have.Message != want.Message {
			t.Errorf("%s: boto3 saw %+v, want %+v", name, have, want)
		}
	}

	// What the server recorded from boto3's request.
	in := s.Instances()[0]
	if in.RootVolumeGB != 20 || in.VolumeTags["hangar:pool"] != "boto" || !slices.Equal(in.SecurityGroups, []string{"sg-0123456789abcdef0"}) || in.KeyName != "ops" {
		t.Errorf("server saw %+v", in)
	}
}
