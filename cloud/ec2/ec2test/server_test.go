package ec2test

import (
	"encoding/xml"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud/identity"
)

func TestRequestChecks(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	for _, tc := range []struct {
		name   string
		auth   string
		action string
		kv     []string
		status int
		code   string
	}{
		{"no auth", "", "DescribeInstances", nil, 401, "MissingAuthenticationToken"},
		{"not sigv4", "Basic Zm9vOmJhcg==", "DescribeInstances", nil, 401, "AuthFailure"},
		{"wrong region", strings.Replace(testAuth, "us-east-1", "eu-west-1", 1), "DescribeInstances", nil, 401, "AuthFailure"},
		{"wrong service", strings.Replace(testAuth, "/ec2/", "/s3/", 1), "DescribeInstances", nil, 401, "AuthFailure"},
		{"unknown action", testAuth, "DescribeVpcs", nil, 400, "InvalidAction"},
		{"unknown parameter", testAuth, "DescribeInstances", []string{"InstanceIds.member.1", "i-0123456789abcdef0"}, 400, "UnknownParameter"},
		{"zero index", testAuth, "DescribeInstances", []string{"InstanceId.0", "i-0123456789abcdef0"}, 400, "UnknownParameter"},
		{"missing image", testAuth, "RunInstances", []string{"MinCount", "1", "MaxCount", "1"}, 400, "MissingParameter"},
		{"missing count", testAuth, "RunInstances", []string{"ImageId", DefaultImageID, "MinCount", "1"}, 400, "MissingParameter"},
		{"bad count", testAuth, "RunInstances", []string{"ImageId", DefaultImageID, "MinCount", "2", "MaxCount", "1"}, 400, "InvalidParameterValue"},
		{"malformed image", testAuth, "RunInstances", []string{"ImageId", "ami-xyz", "MinCount", "1", "MaxCount", "1"}, 400, "InvalidAMIID.Malformed"},
		{"unknown image", testAuth, "RunInstances", []string{"ImageId", "ami-00000000000000000", "MinCount", "1", "MaxCount", "1"}, 400, "InvalidAMIID.NotFound"},
		{"unknown subnet", testAuth, "RunInstances", []string{"ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "SubnetId", "subnet-eu-west-1a"}, 400, "InvalidSubnetID.NotFound"},
		{"unknown zone", testAuth, "RunInstances", []string{"ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "Placement.AvailabilityZone", "us-east-1z"}, 400, "InvalidParameterValue"},
		{"bad hop limit", testAuth, "RunInstances", []string{"ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "MetadataOptions.HttpPutResponseHopLimit", "65"}, 400, "InvalidParameterValue"},
		{"aws: tag", testAuth, "RunInstances", []string{"ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", "aws:x"}, 400, "InvalidParameterValue"},
		{"malformed id", testAuth, "TerminateInstances", []string{"InstanceId.1", "i-nothex"}, 400, "InvalidInstanceID.Malformed"},
		{"no ids", testAuth, "TerminateInstances", nil, 400, "MissingParameter"},
		{"bad filter", testAuth, "DescribeInstances", []string{"Filter.1.Name", "vpc-id", "Filter.1.Value.1", "x"}, 400, "InvalidParameterValue"},
		{"dry run", testAuth, "DescribeInstances", []string{"DryRun", "true"}, 412, "DryRunOperation"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantError(t, callAuth(t, s, tc.auth, tc.action, tc.kv...), tc.status, tc.code)
		})
	}
	if got := s.Calls()["DescribeInstances"]; got != 8 {
		t.Errorf("Calls()[DescribeInstances] = %d, want 8 (failed calls count)", got)
	}
	if got := s.Errors()["RunInstances/MissingParameter"]; got != 2 {
		t.Errorf("Errors()[RunInstances/MissingParameter] = %d, want 2", got)
	}
	if n := len(s.Instances()); n != 0 {
		t.Errorf("%d instances after only failed launches", n)
	}
}

func TestLifecycle(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	importKey(t, s, "ops")
	r := run(t, s, 2,
		"InstanceType", "t3.small", "SubnetId", "subnet-us-east-1b", "KeyName", "ops",
		"SecurityGroupId.1", "sg-0123456789abcdef0",
		"IamInstanceProfile.Name", "hangar-worker",
		"MetadataOptions.HttpTokens", "required", "MetadataOptions.HttpPutResponseHopLimit", "1",
		"BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.VolumeSize", "30",
		"TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", "hangar:pool", "TagSpecification.1.Tag.1.Value", "demo",
		"TagSpecification.2.ResourceType", "volume", "TagSpecification.2.Tag.1.Key", "hangar:pool", "TagSpecification.2.Tag.1.Value", "demo",
		"UserData", b64("#!/bin/sh\necho hi\n"), "ClientToken", "tok-lifecycle")
	ids := r.instanceIDs()
	if len(ids) != 2 || !validID(ids[0], "i-") || len(ids[0]) != 19 {
		t.Fatalf("launched %v, want two i-+17 hex ids", ids)
	}
	if got := r.root.texts("instancesSet/item/instanceState/name"); !slices.Equal(got, []string{"pending", "pending"}) {
		t.Errorf("states after RunInstances = %v, want pending", got)
	}
	if got := r.root.get("instancesSet/item/placement/availabilityZone"); got != "us-east-1b" {
		t.Errorf("zone = %q, want the subnet's us-east-1b", got)
	}
	if got := r.root.get("instancesSet/item/tagSet/item/key"); got != "hangar:pool" {
		t.Errorf("tag key = %q", got)
	}
	got := s.Instances()[0]
	if got.HTTPTokens != "required" || got.HopLimit != 1 || got.RootVolumeGB != 30 || got.Type != "t3.small" ||
		got.VolumeTags["hangar:pool"] != "demo" || string(got.UserData) != "#!/bin/sh\necho hi\n" ||
		got.Profile != "arn:aws:iam::123456789012:instance-profile/hangar-worker" || got.Market != "on-demand" {
		t.Errorf("Instances()[0] = %+v", got)
	}

	d := mustCall(t, s, "DescribeInstances", "Filter.1.Name", "tag:hangar:pool", "Filter.1.Value.1", "de*",
		"Filter.2.Name", "instance-state-name", "Filter.2.Value.1", "running")
	if got := d.instanceIDs(); !slices.Equal(got, ids) {
		t.Errorf("described %v, want %v", got, ids)
	}
	if n := len(d.root.all("reservationSet/item")); n != 1 {
		t.Errorf("%d reservations, want the launch's one", n)
	}
	if s.Running() != 2 || s.PeakRunning() != 2 {
		t.Errorf("Running %d, PeakRunning %d; want 2, 2", s.Running(), s.PeakRunning())
	}

	stop := mustCall(t, s, "StopInstances", "InstanceId.1", ids[0])
	if p, c := stop.root.get("instancesSet/item/previousState/name"), stop.root.get("instancesSet/item/currentState/name"); p != "running" || c != "stopping" {
		t.Errorf("stop: %s → %s, want running → stopping", p, c)
	}
	start := mustCall(t, s, "StartInstances", "InstanceId.1", ids[0])
	if p, c := start.root.get("instancesSet/item/previousState/name"), start.root.get("instancesSet/item/currentState/name"); p != "stopped" || c != "pending" {
		t.Errorf("start: %s → %s, want stopped → pending", p, c)
	}
	term := mustCall(t, s, "TerminateInstances", "InstanceId.1", ids[0], "InstanceId.2", ids[1])
	if got := term.root.texts("instancesSet/item/currentState/code"); !slices.Equal(got, []string{"32", "32"}) {
		t.Errorf("terminate current state codes %v, want 32 (shutting-down)", got)
	}
	d = mustCall(t, s, "DescribeInstances", "InstanceId.1", ids[0])
	if got := d.root.get("reservationSet/item/instancesSet/item/instanceState/name"); got != "terminated" {
		t.Errorf("after terminate: %s, want terminated (still listed)", got)
	}
	again := mustCall(t, s, "TerminateInstances", "InstanceId.1", ids[0])
	if got := again.root.get("instancesSet/item/previousState/name"); got != "terminated" {
		t.Errorf("second terminate: previous %s, want terminated", got)
	}
	wantError(t, call(t, s, "StartInstances", "InstanceId.1", ids[0]), 400, "IncorrectInstanceState")
	if s.Running() != 0 || s.PeakRunning() != 2 {
		t.Errorf("Running %d, PeakRunning %d; want 0, 2", s.Running(), s.PeakRunning())
	}
}

func TestTimedStates(t *testing.T) {
	t.Parallel()
	// Delays long enough that a loaded machine answers the next call
	// within them.
	s := newServer(t, Options{BootDelay: 400 * time.Millisecond, StopDelay: 400 * time.Millisecond, TerminatedTTL: 600 * time.Millisecond})
	id := run(t, s, 1).instanceIDs()[0]
	state := func() string {
		t.Helper()
		return mustCall(t, s, "DescribeInstances").root.get("reservationSet/item/instancesSet/item/instanceState/name")
	}
	if got := state(); got != "pending" {
		t.Fatalf("right after launch: %s, want pending", got)
	}
	time.Sleep(450 * time.Millisecond)
	if got := state(); got != "running" {
		t.Fatalf("after BootDelay: %s, want running", got)
	}
	mustCall(t, s, "TerminateInstances", "InstanceId.1", id)
	if got := state(); got != "shutting-down" {
		t.Fatalf("right after terminate: %s, want shutting-down", got)
	}
	time.Sleep(450 * time.Millisecond)
	if got := state(); got != "terminated" {
		t.Fatalf("after StopDelay: %s, want terminated", got)
	}
	time.Sleep(650 * time.Millisecond)
	if got := state(); got != "" {
		t.Fatalf("after TerminatedTTL: %q, want no longer listed", got)
	}
	wantError(t, call(t, s, "DescribeInstances", "InstanceId.1", id), 400, "InvalidInstanceID.NotFound")
}

func TestTerminateUnknownFailsWholeCall(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	id := run(t, s, 1).instanceIDs()[0]
	unknown := []string{"i-0000000000000000a", "i-0000000000000000b"}
	r := call(t, s, "TerminateInstances", "InstanceId.1", id, "InstanceId.2", unknown[0], "InstanceId.3", unknown[1])
	wantError(t, r, 400, "InvalidInstanceID.NotFound")
	if want := "The instance IDs '" + unknown[0] + ", " + unknown[1] + "' do not exist"; r.message() != want {
		t.Errorf("message %q, want %q", r.message(), want)
	}
	if s.Running() != 1 {
		t.Errorf("the known instance was terminated although the call failed")
	}
	r = call(t, s, "TerminateInstances", "InstanceId.1", unknown[0])
	if want := "The instance ID '" + unknown[0] + "' does not exist"; r.message() != want {
		t.Errorf("message %q, want %q", r.message(), want)
	}
}

func TestThrottle(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	s.Throttle("", 0.3)
	s.Throttle("RunInstances", 1)
	throttled := 0
	for range 100 {
		r := call(t, s, "DescribeInstances")
		switch {
		case r.status == http.StatusOK:
		case r.status == http.StatusServiceUnavailable && r.code() == "RequestLimitExceeded":
			throttled++
		default:
			t.Fatalf("unexpected HTTP %d %s", r.status, r.code())
		}
	}
	if throttled != 30 {
		t.Errorf("%d of 100 calls throttled, want exactly 30", throttled)
	}
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1"), 503, "RequestLimitExceeded")
	if c := s.Calls(); c["DescribeInstances"] != 100 || c["RunInstances"] != 1 {
		t.Errorf("Calls() = %v, want throttled calls counted", c)
	}
	if e := s.Errors()["DescribeInstances/RequestLimitExceeded"]; e != 30 {
		t.Errorf("Errors() counted %d throttles, want 30", e)
	}
	s.Throttle("", 0)
	s.Throttle("RunInstances", 0)
	run(t, s, 1)
}

func TestCapacity(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	s.SetCapacity(func(typ, zone, market string) string {
		switch {
		case typ == "t3.small" && zone == "us-east-1a":
			return "InsufficientInstanceCapacity"
		case typ == "t3a.small":
			return "Unsupported"
		case market == "spot" && zone == "us-east-1b":
			return "InsufficientInstanceCapacity"
		case market == "spot" && zone == "us-east-1c":
			return "SpotMaxPriceTooLow"
		}
		return ""
	})
	base := []string{"ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1"}
	spot := []string{"InstanceMarketOptions.MarketType", "spot", "InstanceMarketOptions.SpotOptions.SpotInstanceType", "one-time"}
	for _, tc := range []struct {
		name   string
		kv     []string
		status int
		code   string
		msg    string
	}{
		{"type/zone out", []string{"InstanceType", "t3.small", "SubnetId", "subnet-us-east-1a"}, 500, "InsufficientInstanceCapacity", "sufficient t3.small capacity in the Availability Zone you requested (us-east-1a)"},
		{"other zone fine", []string{"InstanceType", "t3.small", "SubnetId", "subnet-us-east-1b"}, 200, "", ""},
		{"type unsupported", []string{"InstanceType", "t3a.small"}, 400, "Unsupported", "not supported"},
		{"spot out", append([]string{"InstanceType", "m5.large", "SubnetId", "subnet-us-east-1b"}, spot...), 500, "InsufficientInstanceCapacity", "no Spot capacity"},
		{"spot price", append([]string{"InstanceType", "m5.large", "SubnetId", "subnet-us-east-1c"}, spot...), 400, "SpotMaxPriceTooLow", ""},
		{"on-demand same offering", []string{"InstanceType", "m5.large", "SubnetId", "subnet-us-east-1b"}, 200, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := call(t, s, "RunInstances", append(slices.Clone(base), tc.kv...)...)
			if r.status != tc.status || r.code() != tc.code || !strings.Contains(r.message(), tc.msg) {
				t.Errorf("got HTTP %d %q %q, want HTTP %d %q containing %q", r.status, r.code(), r.message(), tc.status, tc.code, tc.msg)
			}
		})
	}
	// A stopped instance restarts only where there is capacity.
	id := run(t, s, 1, "InstanceType", "m5.large", "SubnetId", "subnet-us-east-1a").instanceIDs()[0]
	mustCall(t, s, "StopInstances", "InstanceId.1", id)
	s.SetCapacity(func(string, string, string) string { return "InsufficientInstanceCapacity" })
	wantError(t, call(t, s, "StartInstances", "InstanceId.1", id), 500, "InsufficientInstanceCapacity")
	s.SetCapacity(nil)
	mustCall(t, s, "StartInstances", "InstanceId.1", id)
}

func TestQuota(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	s.SetQuota(3, "InstanceLimitExceeded")
	r := mustCall(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "2", "MaxCount", "5")
	ids := r.instanceIDs()
	if len(ids) != 3 {
		t.Fatalf("launched %d, want 3: as many as the quota allows, at least MinCount", len(ids))
	}
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1"), 400, "InstanceLimitExceeded")
	mustCall(t, s, "StopInstances", "InstanceId.1", ids[0])
	run(t, s, 1) // the stopped one no longer counts
	wantError(t, call(t, s, "StartInstances", "InstanceId.1", ids[0]), 400, "InstanceLimitExceeded")
	s.SetQuota(3, "VcpuLimitExceeded")
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1"), 400, "VcpuLimitExceeded")
	if s.PeakRunning() != 3 {
		t.Errorf("PeakRunning %d, want 3", s.PeakRunning())
	}
	s.SetQuota(0, "")
	run(t, s, 2)
}

func TestHideNewFor(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	s.HideNewFor(500 * time.Millisecond)
	id := run(t, s, 1, "TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", "k", "TagSpecification.1.Tag.1.Value", "v").instanceIDs()[0]
	wantError(t, call(t, s, "DescribeInstances", "InstanceId.1", id), 400, "InvalidInstanceID.NotFound")
	wantError(t, call(t, s, "TerminateInstances", "InstanceId.1", id), 400, "InvalidInstanceID.NotFound")
	wantError(t, call(t, s, "CreateTags", "ResourceId.1", id, "Tag.1.Key", "a", "Tag.1.Value", "b"), 400, "InvalidInstanceID.NotFound")
	if got := mustCall(t, s, "DescribeInstances", "Filter.1.Name", "tag-key", "Filter.1.Value.1", "k").instanceIDs(); len(got) != 0 {
		t.Errorf("a new instance was listed: %v", got)
	}
	if s.Running() != 1 {
		t.Errorf("Running() = %d: hidden instances still run", s.Running())
	}
	time.Sleep(550 * time.Millisecond)
	if got := mustCall(t, s, "DescribeInstances", "Filter.1.Name", "tag-key", "Filter.1.Value.1", "k").instanceIDs(); !slices.Equal(got, []string{id}) {
		t.Errorf("after the delay listed %v, want [%s]", got, id)
	}
	mustCall(t, s, "TerminateInstances", "InstanceId.1", id)
}

func TestClientTokenIdempotency(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	args := []string{"InstanceType", "t3.small", "ClientToken", "intent-1"}
	first := run(t, s, 2, args...)
	second := run(t, s, 2, args...)
	if !slices.Equal(first.instanceIDs(), second.instanceIDs()) || first.root.get("reservationId") != second.root.get("reservationId") {
		t.Errorf("repeat launched %v in %s, want %v in %s", second.instanceIDs(), second.root.get("reservationId"), first.instanceIDs(), first.root.get("reservationId"))
	}
	if n := s.Launches("intent-1"); n != 1 {
		t.Errorf("Launches = %d, want 1", n)
	}
	r := call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "2", "MaxCount", "2", "InstanceType", "t3a.small", "ClientToken", "intent-1")
	wantError(t, r, 400, "IdempotentParameterMismatch")

	// A launch that failed does not use up its token: the retry on
	// another offering with the same token goes ahead.
	s.SetCapacity(func(typ, _, _ string) string {
		if typ == "t3.small" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "InstanceType", "t3.small", "ClientToken", "intent-2"), 500, "InsufficientInstanceCapacity")
	run(t, s, 1, "InstanceType", "t3a.small", "ClientToken", "intent-2")

	// Concurrent retries of one launch start it once.
	var wg sync.WaitGroup
	got := make([][]string, 20)
	for i := range got {
		wg.Go(func() { got[i] = run(t, s, 1, "ClientToken", "intent-3").instanceIDs() })
	}
	wg.Wait()
	for _, ids := range got {
		if !slices.Equal(ids, got[0]) {
			t.Fatalf("concurrent repeats got different instances: %v", got)
		}
	}
	if n := s.Launches("intent-3"); n != 1 {
		t.Errorf("Launches = %d after 20 concurrent repeats, want 1", n)
	}
	if n := len(s.Instances()); n != 4 {
		t.Errorf("%d instances, want 4", n)
	}
	// The client-token filter finds what a token launched.
	if ids := mustCall(t, s, "DescribeInstances", "Filter.1.Name", "client-token", "Filter.1.Value.1", "intent-1").instanceIDs(); !slices.Equal(ids, first.instanceIDs()) {
		t.Errorf("client-token filter found %v, want %v", ids, first.instanceIDs())
	}
}

func TestPagination(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	var want []string
	for range 23 {
		want = append(want, run(t, s, 1, "TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", "hangar:pool", "TagSpecification.1.Tag.1.Value", "p").instanceIDs()...)
	}
	run(t, s, 2) // untagged, filtered out
	var got []string
	token, pages := "", 0
	for {
		kv := []string{"MaxResults", "5", "Filter.1.Name", "tag:hangar:pool", "Filter.1.Value.1", "p"}
		if token != "" {
			kv = append(kv, "NextToken", token)
		}
		r := mustCall(t, s, "DescribeInstances", kv...)
		pages++
		page := r.instanceIDs()
		if len(page) > 5 {
			t.Fatalf("page of %d, want at most 5", len(page))
		}
		got = append(got, page...)
		if token = r.root.get("nextToken"); token == "" {
			break
		}
	}
	if !slices.Equal(got, want) || pages != 5 {
		t.Errorf("paged %d instances in %d pages, want %d in 5, in launch order", len(got), pages, len(want))
	}
	wantError(t, call(t, s, "DescribeInstances", "MaxResults", "4"), 400, "InvalidParameterValue")
	wantError(t, call(t, s, "DescribeInstances", "MaxResults", "1001"), 400, "InvalidParameterValue")
	wantError(t, call(t, s, "DescribeInstances", "MaxResults", "5", "InstanceId.1", want[0]), 400, "InvalidParameterCombination")
	wantError(t, call(t, s, "DescribeInstances", "MaxResults", "5", "NextToken", "garbage"), 400, "InvalidPaginationToken")
	if n := len(mustCall(t, s, "DescribeInstances").instanceIDs()); n != 25 {
		t.Errorf("unpaged describe returned %d, want all 25", n)
	}
}

func TestUserDataLimit(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	run(t, s, 1, "UserData", b64(strings.Repeat("x", 16384)))
	r := call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "UserData", b64(strings.Repeat("x", 16385)))
	wantError(t, r, 400, "InvalidParameterValue")
	if r.message() != "User data is limited to 16384 bytes" {
		t.Errorf("message %q", r.message())
	}
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "UserData", "not base64!"), 400, "InvalidParameterValue")

	id := s.Instances()[0].ID
	a := mustCall(t, s, "DescribeInstanceAttribute", "InstanceId", id, "Attribute", "userData")
	if got := a.root.get("userData/value"); got != b64(strings.Repeat("x", 16384)) {
		t.Errorf("userData attribute has %d characters", len(got))
	}
}

func TestSpotInstance(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	r := run(t, s, 1, "InstanceMarketOptions.MarketType", "spot")
	if got := r.root.get("instancesSet/item/instanceLifecycle"); got != "spot" {
		t.Errorf("instanceLifecycle = %q, want spot", got)
	}
	id := r.instanceIDs()[0]
	wantError(t, call(t, s, "StopInstances", "InstanceId.1", id), 400, "UnsupportedOperation")
	if ids := mustCall(t, s, "DescribeInstances", "Filter.1.Name", "instance-lifecycle", "Filter.1.Value.1", "spot").instanceIDs(); !slices.Equal(ids, []string{id}) {
		t.Errorf("instance-lifecycle filter: %v", ids)
	}
}

func TestTagsImagesZonesConsole(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	id := run(t, s, 1).instanceIDs()[0]
	mustCall(t, s, "CreateTags", "ResourceId.1", id, "Tag.1.Key", "hangar:owner", "Tag.1.Value", "store-1")
	if ids := mustCall(t, s, "DescribeInstances", "Filter.1.Name", "tag:hangar:owner", "Filter.1.Value.1", "store-1").instanceIDs(); !slices.Equal(ids, []string{id}) {
		t.Errorf("tag set by CreateTags not filterable: %v", ids)
	}

	s.AddImage(Image{ID: "ami-0aaaaaaaaaaaaaaa1", Name: "hangar-worker-2026-01", Owner: "123456789012", Created: time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC)})
	s.AddImage(Image{ID: "ami-0aaaaaaaaaaaaaaa2", Name: "hangar-worker-2026-02", Owner: "123456789012", Created: time.Date(2026, 2, 5, 0, 0, 0, 0, time.UTC)})
	s.AddImage(Image{ID: "ami-0aaaaaaaaaaaaaaa3", Name: "hangar-worker-2026-03", Owner: "999999999999"})
	im := mustCall(t, s, "DescribeImages", "Owner.1", "self", "Filter.1.Name", "name", "Filter.1.Value.1", "hangar-worker-*")
	if got := im.root.texts("imagesSet/item/imageId"); !slices.Equal(got, []string{"ami-0aaaaaaaaaaaaaaa1", "ami-0aaaaaaaaaaaaaaa2"}) {
		t.Errorf("DescribeImages found %v", got)
	}
	if got := im.root.texts("imagesSet/item/creationDate"); got[1] != "2026-02-05T00:00:00.000Z" {
		t.Errorf("creationDate %v", got)
	}
	wantError(t, call(t, s, "DescribeImages", "ImageId.1", "ami-0bbbbbbbbbbbbbbbb"), 400, "InvalidAMIID.NotFound")
	s.AddImage(Image{ID: DefaultImageID, Name: "replaced"})
	im = mustCall(t, s, "DescribeImages", "ImageId.1", DefaultImageID)
	if got := im.root.texts("imagesSet/item/name"); !slices.Equal(got, []string{"replaced"}) || im.root.get("imagesSet/item/imageOwnerId") != "123456789012" {
		t.Errorf("AddImage with a known id: %s", im.body)
	}

	z := mustCall(t, s, "DescribeAvailabilityZones")
	if got := z.root.texts("availabilityZoneInfo/item/zoneName"); !slices.Equal(got, []string{"us-east-1a", "us-east-1b", "us-east-1c"}) {
		t.Errorf("zones %v", got)
	}

	c := mustCall(t, s, "GetConsoleOutput", "InstanceId", id)
	if c.root.get("output") == "" || c.root.get("timestamp") == "" {
		t.Errorf("console output without output or timestamp: %s", c.body)
	}
}

func TestManyInstancesAreCheap(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	start := time.Now()
	for range 10 {
		run(t, s, 100, "TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", "hangar:pool", "TagSpecification.1.Tag.1.Value", "big")
	}
	n := 0
	token := ""
	for {
		kv := []string{"MaxResults", "1000", "Filter.1.Name", "tag:hangar:pool", "Filter.1.Value.1", "big"}
		if token != "" {
			kv = append(kv, "NextToken", token)
		}
		r := mustCall(t, s, "DescribeInstances", kv...)
		n += len(r.instanceIDs())
		if token = r.root.get("nextToken"); token == "" {
			break
		}
	}
	if n != 1000 || s.Running() != 1000 {
		t.Errorf("listed %d, running %d; want 1000", n, s.Running())
	}
	t.Logf("1,000 instances launched and listed in %v", time.Since(start))
}

func TestStatusForCodes(t *testing.T) {
	t.Parallel()
	for code, want := range map[string]int{
		"InsufficientInstanceCapacity": 500, "RequestLimitExceeded": 503, "Unavailable": 503,
		"InstanceLimitExceeded": 400, "Unsupported": 400, "InvalidInstanceID.NotFound": 400,
	} {
		if got := httpStatus(code); got != want {
			t.Errorf("httpStatus(%s) = %d, want %d", code, got, want)
		}
	}
	if got := pattern("Filter.12.Value.3"); got != "Filter.N.Value.N" {
		t.Errorf("pattern = %q", got)
	}
	for _, tc := range []struct {
		pat, s string
		want   bool
	}{{"de*", "demo", true}, {"*", "", true}, {"d?mo", "demo", true}, {"d?mo", "dmo", false}, {`a\*`, "a*", true}, {`a\*`, "ab", false}, {"*-2026-*", "w-2026-01", true}} {
		if got := glob(tc.pat, tc.s); got != tc.want {
			t.Errorf("glob(%q, %q) = %v", tc.pat, tc.s, got)
		}
	}
}

// RateLimit answers RequestLimitExceeded once the bucket is empty, and
// refills it over time.
func TestRateLimitBucket(t *testing.T) {
	s := New(Options{})
	defer s.Close()
	s.RateLimit("DescribeAvailabilityZones", 3, 50)
	b := &bucket{capacity: 3, tokens: 3, rate: 50, at: time.Now()}
	now := b.at
	for i := 0; i < 3; i++ {
		if !b.take(now) {
			t.Fatalf("call %d refused within the burst", i)
		}
	}
	if b.take(now) {
		t.Fatal("call beyond the burst allowed")
	}
	if !b.take(now.Add(25 * time.Millisecond)) {
		t.Fatal("no refill after 25ms at 50/s")
	}
	s.RateLimit("DescribeAvailabilityZones", 1, 0.001)
	s.throttled("DescribeAvailabilityZones")
	if !s.throttled("DescribeAvailabilityZones") {
		t.Error("server did not throttle beyond its bucket")
	}
}

// RefuseFilter refuses DescribeInstances with a filter as a cloud that
// lacks it does: a 400 code, or an HTML 500 no XML decoder reads.
func TestRefuseFilter(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	tagged := []string{"TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", "hangar:intent", "TagSpecification.1.Tag.1.Value", "k1"}
	run(t, s, 1, append([]string{"ClientToken", "tok-1"}, tagged...)...)
	byToken := []string{"Filter.1.Name", "client-token", "Filter.1.Value.1", "tok-1"}
	byTag := []string{"Filter.1.Name", "tag:hangar:intent", "Filter.1.Value.1", "k1"}

	s.RefuseFilter("client-token", Refuse400)
	wantError(t, call(t, s, "DescribeInstances", byToken...), 400, "InvalidParameterValue")
	if got := mustCall(t, s, "DescribeInstances", byTag...).instanceIDs(); len(got) != 1 {
		t.Errorf("the tag filter found %v with client-token refused, want one instance", got)
	}

	s.RefuseFilter("client-token", HTML500)
	form := url.Values{"Action": {"DescribeInstances"}, "Version": {apiVersion}}
	for i := 0; i < len(byToken); i += 2 {
		form.Add(byToken[i], byToken[i+1])
	}
	req, err := http.NewRequest(http.MethodPost, s.URL(), strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Authorization", testAuth)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 500 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Errorf("HTML500 answered HTTP %d %s, want 500 text/html", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var anything struct{}
	if err := xml.Unmarshal(body, &anything); err == nil {
		t.Errorf("the HTML 500 body is well-formed XML; a cloud's error page is not:\n%s", body)
	}
	if n := s.Errors()["DescribeInstances/HTML500"]; n != 1 {
		t.Errorf("Errors() counted %d HTML 500s, want 1", n)
	}

	s.RefuseFilter("tag:", Refuse400)
	wantError(t, call(t, s, "DescribeInstances", byTag...), 400, "InvalidParameterValue")
	s.RefuseFilter("tag:", Serve)
	s.RefuseFilter("client-token", Serve)
	if got := mustCall(t, s, "DescribeInstances", byToken...).instanceIDs(); len(got) != 1 {
		t.Errorf("client-token served again found %v, want one instance", got)
	}
}

// RateLimitResource charges the instances a call acts on to a bucket of
// its own, as AWS's resource rate limits do: a launch or terminate the
// bucket cannot pay for is throttled and does nothing; a replayed launch
// and a terminate of what is already ending cost nothing.
func TestResourceBucket(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	s.RateLimitResource("RunInstances", 10, 0.001)
	s.RateLimitResource("TerminateInstances", 3, 0.001)
	first := run(t, s, 6, "ClientToken", "rb-1").instanceIDs()
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "5", "MaxCount", "5"), 503, "RequestLimitExceeded")
	if s.Running() != 6 {
		t.Fatalf("%d running after a throttled launch, want 6", s.Running())
	}
	if again := run(t, s, 6, "ClientToken", "rb-1").instanceIDs(); !slices.Equal(again, first) {
		t.Errorf("replay returned %v, want %v", again, first)
	}
	run(t, s, 4) // what is left: the replay was free
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1"), 503, "RequestLimitExceeded")
	if n := s.Errors()["RunInstances/RequestLimitExceeded"]; n != 2 {
		t.Errorf("Errors() counted %d resource throttles, want 2", n)
	}

	ids := func(list []string) []string {
		var kv []string
		for i, id := range list {
			kv = append(kv, "InstanceId."+strconv.Itoa(i+1), id)
		}
		return kv
	}
	wantError(t, call(t, s, "TerminateInstances", ids(first[:4])...), 503, "RequestLimitExceeded")
	mustCall(t, s, "TerminateInstances", ids(first[:3])...)
	mustCall(t, s, "TerminateInstances", ids(first[:3])...) // already ending: free
	if s.Running() != 7 {
		t.Errorf("%d running, want 7", s.Running())
	}

	s.RateLimitResource("RunInstances", 0, 0)
	run(t, s, 20)
}

// SetCapacityCount starts as many as the offering has, at least MinCount,
// and otherwise fails the launch.
func TestMinCountPartial(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	s.SetCapacityCount(func(typ, zone, market string) int {
		if typ == "t3.small" {
			return 3
		}
		return -1
	})
	r := mustCall(t, s, "RunInstances", "ImageId", DefaultImageID, "InstanceType", "t3.small", "MinCount", "1", "MaxCount", "5")
	if len(r.instanceIDs()) != 3 {
		t.Errorf("launched %d of MaxCount 5 with room for 3, want 3", len(r.instanceIDs()))
	}
	if got := r.root.texts("instancesSet/item/amiLaunchIndex"); !slices.Equal(got, []string{"0", "1", "2"}) {
		t.Errorf("amiLaunchIndex %v, want 0, 1, 2", got)
	}
	for i, in := range s.Instances() {
		if in.LaunchIndex != i {
			t.Errorf("Instances()[%d].LaunchIndex = %d", i, in.LaunchIndex)
		}
	}
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "InstanceType", "t3.small", "MinCount", "4", "MaxCount", "5"), 500, "InsufficientInstanceCapacity")
	if n := len(run(t, s, 5, "InstanceType", "t3a.small").instanceIDs()); n != 5 {
		t.Errorf("launched %d of an unlimited offering, want 5", n)
	}
}

// IdentityDocument is what the instance would read from its metadata
// service, signed so that the server's certificate verifies it.
func TestIdentityDocumentVerifies(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	id := run(t, s, 1, "InstanceType", "t3.small", "SubnetId", "subnet-us-east-1b").instanceIDs()[0]
	doc, sig, err := s.IdentityDocument(id)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := s.IdentityCertificate()
	if err != nil {
		t.Fatal(err)
	}
	v, err := identity.FromPEM(cert)
	if err != nil {
		t.Fatal(err)
	}
	d, err := v.Verify("us-east-1", doc, sig)
	if err != nil {
		t.Fatal(err)
	}
	in := s.Instances()[0]
	if d.InstanceID != id || d.InstanceType != "t3.small" || d.AvailabilityZone != "us-east-1b" || d.AccountID != "123456789012" ||
		d.PrivateIP != in.PrivateIP || d.ImageID != DefaultImageID || !d.PendingTime.Equal(in.LaunchTime.UTC().Truncate(time.Second)) {
		t.Errorf("document %+v does not describe the instance %+v", d, in)
	}
	if _, err := v.Verify("eu-west-1", doc, sig); err == nil {
		t.Error("a us-east-1 document verified for eu-west-1")
	}
	tampered := []byte(strings.Replace(string(doc), id, "i-0123456789abcdef0", 1))
	if _, err := v.Verify("us-east-1", tampered, sig); err == nil {
		t.Error("a document naming another instance verified under the first one's signature")
	}
	if _, _, err := s.IdentityDocument("i-00000000000000000"); err == nil {
		t.Error("a document for an unknown instance")
	}
}

// Timeline keeps each request's arrival, end and code, per action.
func TestTimeline(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	before := time.Now()
	run(t, s, 2)
	s.Throttle("RunInstances", 1)
	call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1")
	mustCall(t, s, "DescribeInstances")
	after := time.Now()
	spans := s.Timeline("RunInstances")
	if len(spans) != 2 || spans[0].Code != "" || spans[1].Code != "RequestLimitExceeded" {
		t.Fatalf("Timeline(RunInstances) = %+v, want a success then a throttle", spans)
	}
	for _, sp := range spans {
		if sp.Start.Before(before) || sp.End.Before(sp.Start) || sp.End.After(after) {
			t.Errorf("span %+v is not within the calls (%v to %v)", sp, before, after)
		}
	}
	if !spans[0].End.Before(spans[1].Start) && !spans[0].End.Equal(spans[1].Start) {
		t.Errorf("spans out of order: %+v", spans)
	}
	if n := len(s.Timeline("DescribeInstances")); n != 1 {
		t.Errorf("%d DescribeInstances spans, want 1", n)
	}
}
