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

	"github.com/hangar-ci/hangar/internal/testutil"
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
	testutil.NeedPythonModule(t, python, "boto3", "a second EC2 client: apt-get install python3-boto3")
	s := newServer(t, Options{})
	if err := s.Region("").AddKeyPair("ops", publicKey(t, "")); err != nil {
		t.Fatal(err)
	}
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

// TestBoto3Storage drives volumes, snapshots, images and key pairs with
// boto3 across two regions, its waiters and paginator included.
func TestBoto3Storage(t *testing.T) {
	t.Parallel()
	testutil.NeedPythonModule(t, python, "boto3", "a second EC2 client: apt-get install python3-boto3")
	// Short delays, so that every waiter sees a pending state first.
	s := newServer(t, Options{
		Regions:     []string{"us-east-1", "eu-west-1"},
		VolumeDelay: 300 * time.Millisecond, SnapshotDelay: 300 * time.Millisecond, ImageDelay: 300 * time.Millisecond,
	})
	key := strings.TrimSpace(string(publicKey(t, "boto@example")))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "testdata/boto3_storage.py", s.URL(), key)
	cmd.Env = botoEnv(t)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	stdout, err := cmd.Output()
	if err != nil {
		t.Fatalf("boto3 script: %v\n%s", err, stderr.String())
	}
	t.Logf("boto3 script ran in %v; calls %v", time.Since(start), s.Calls())

	type clientError struct {
		Code, Message string
		Status        int
	}
	var got struct {
		Key struct {
			ID, Fingerprint, Type string
			DescribedID           string `json:"described_id"`
			PublicKey             string `json:"public_key"`
			Tags                  map[string]string
		}
		KeyName string `json:"key_name"`
		Volume  struct {
			ID, State, Type string
			Size            int
			Tags            map[string]string
		}
		VolumeAgain   string     `json:"volume_again"`
		Attach        []string   `json:"attach"`
		Attached      []string   `json:"attached"`
		SnapshotState string     `json:"snapshot_state"`
		SnapshotIDs   []string   `json:"snapshot_ids"`
		SnapshotPages [][]string `json:"snapshot_pages"`
		Copy          struct {
			ID, State, Progress, Description string
			Size                             int
			Tags                             map[string]string
		}
		WestVolumeSize int `json:"west_volume_size"`
		ImageCopy      struct {
			ID, Source, Name, Root string
			Devices                [][]any
			Tags                   map[string]string
		} `json:"image_copy"`
		Registered []any `json:"registered"`
		Detach     string
		Untagged   map[string]string
		Errors     map[string]clientError
	}
	if err := json.Unmarshal(stdout, &got); err != nil {
		t.Fatalf("reading the script's JSON: %v\n%s", err, stdout)
	}

	kps := s.Region("us-east-1").KeyPairs()
	if got.Key.ID == "" || got.Key.DescribedID != got.Key.ID || got.Key.Type != "ed25519" || got.Key.PublicKey != key ||
		got.Key.Tags["hangar:staging"] != "boto" || got.KeyName != "staging" || len(kps) != 0 {
		t.Errorf("key pair as boto3 saw it: %+v, key name %q; left %+v", got.Key, got.KeyName, kps)
	}
	if v := got.Volume; v.State != "creating" || v.Size != 2 || v.Type != "gp3" || v.Tags["hangar:staging"] != "boto" || got.VolumeAgain != v.ID {
		t.Errorf("create_volume: %+v, repeat %s", v, got.VolumeAgain)
	}
	// volume_in_use is satisfied while the attachment is still attaching.
	if len(got.Attach) != 3 || got.Attach[0] != "attaching" || got.Attach[1] != "/dev/sdf" || len(got.Attached) != 4 ||
		got.Attached[0] != got.Volume.ID || got.Attached[1] != "in-use" || got.Attached[3] != "/dev/sdf" {
		t.Errorf("attach %v, then %v", got.Attach, got.Attached)
	}
	var paged []string
	for _, p := range got.SnapshotPages {
		if len(p) > 5 {
			t.Errorf("page of %d with PageSize 5", len(p))
		}
		paged = append(paged, p...)
	}
	if got.SnapshotState != "pending" || len(got.SnapshotPages) != 2 || !slices.Equal(paged, got.SnapshotIDs) {
		t.Errorf("snapshots: first %s, pages %v, want pending and 2 pages of %v", got.SnapshotState, got.SnapshotPages, got.SnapshotIDs)
	}
	if c := got.Copy; c.ID == "" || slices.Contains(got.SnapshotIDs, c.ID) || c.State != "completed" || c.Progress != "100%" || c.Size != 2 ||
		c.Description != "to the west" || c.Tags["hangar:staging"] != "boto" || got.WestVolumeSize != 2 {
		t.Errorf("copy_snapshot: %+v, volume of it %d GiB", c, got.WestVolumeSize)
	}
	if west := s.Region("eu-west-1").Snapshots(); len(west) != 3 || west[0].ID != got.Copy.ID {
		t.Errorf("eu-west-1 snapshots %+v: want the copy and the image copy's two", west)
	}
	ic := got.ImageCopy
	if ic.ID == "" || ic.ID == ic.Source || ic.Name != "boto-image" || ic.Root != "/dev/xvda" || ic.Tags["hangar:staging"] != "boto" ||
		len(ic.Devices) != 2 || ic.Devices[0][0] != "/dev/xvda" || ic.Devices[1][0] != "/dev/sdf" || ic.Devices[1][2] != 2.0 {
		t.Errorf("copy_image: %+v", ic)
	}
	if len(got.Registered) != 4 || got.Registered[0] != got.Registered[1] || got.Registered[2] != "hvm" || got.Registered[3] != 8.0 {
		t.Errorf("register_image: %v", got.Registered)
	}
	if got.Detach != "detaching" || len(got.Untagged) != 0 || len(s.Region("us-east-1").Volumes()) != 0 {
		t.Errorf("detach %s, tags left %v, volumes left %+v", got.Detach, got.Untagged, s.Region("us-east-1").Volumes())
	}
	for name, want := range map[string]clientError{
		"duplicate_key":         {"InvalidKeyPair.Duplicate", "The keypair 'staging' already exists.", 400},
		"unknown_key":           {"InvalidKeyPair.NotFound", "The key pair 'staging' does not exist", 400},
		"zone_mismatch":         {"InvalidVolume.ZoneMismatch", "", 400},
		"delete_attached":       {"VolumeInUse", "", 400},
		"smaller_than_snapshot": {"InvalidParameterValue", "", 400},
		"copy_in_east":          {"InvalidSnapshot.NotFound", "The snapshot '" + got.Copy.ID + "' does not exist.", 400},
		"duplicate_image":       {"InvalidAMIName.Duplicate", "", 400},
		"deleted_key":           {"InvalidKeyPair.NotFound", "", 400},
		"unknown_region":        {"AuthFailure", "Credential should be scoped to a valid region, not 'ap-south-1'.", 401},
	} {
		have := got.Errors[name]
		if have.Code != want.Code || have.Status != want.Status || want.Message != "" && have.Message != want.Message {
			t.Errorf("%s: boto3 saw %+v, want %+v", name, have, want)
		}
	}
}
