package ec2

// Tests of the pieces that need no EC2: offerings, tokens, the offering
// memory, request building, error classes, image references and states.
// Everything that talks to EC2 is tested through the real SDK against
// ec2test (provider_test.go).

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/testutil"
)

func TestOfferingsOrder(t *testing.T) {
	tests := []struct {
		name string
		spec cloud.LaunchSpec
		want []string
	}{
		{"types only", cloud.LaunchSpec{InstanceTypes: []string{"a", "b"}}, []string{
			"a in any zone (on-demand)", "b in any zone (on-demand)",
		}},
		{"zones, spot preferred", cloud.LaunchSpec{InstanceTypes: []string{"a", "b"}, Zones: []string{"z1", "z2"}, Spot: "prefer"}, []string{
			"a in z1 (spot)", "a in z1 (on-demand)", "a in z2 (spot)", "a in z2 (on-demand)",
			"b in z1 (spot)", "b in z1 (on-demand)", "b in z2 (spot)", "b in z2 (on-demand)",
		}},
		{"subnets win over zones, spot only", cloud.LaunchSpec{InstanceTypes: []string{"a"}, Zones: []string{"z1"}, Subnets: []string{"s1", "s2"}, Spot: "only"}, []string{
			"a in s1 (spot)", "a in s2 (spot)",
		}},
		{"spot off", cloud.LaunchSpec{InstanceTypes: []string{"a"}, Zones: []string{"z1"}, Spot: "off"}, []string{
			"a in z1 (on-demand)",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			offers, err := offerings(tc.spec)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, o := range offers {
				got = append(got, o.String())
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("offerings =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
	for _, spec := range []cloud.LaunchSpec{{}, {InstanceTypes: []string{"a"}, Spot: "sometimes"}} {
		if _, err := offerings(spec); err == nil {
			t.Errorf("offerings(%+v): no error", spec)
		}
	}
}

func TestClientToken(t *testing.T) {
	a := offering{Type: "t3.small", Zone: "us-east-1a"}
	spotA := a
	spotA.Spot = true
	subnetA := offering{Type: "t3.small", Subnet: "us-east-1a"} // same string, other field
	long := strings.Repeat("x", 300)

	tok := clientToken("intent-1", a)
	if tok != clientToken("intent-1", a) {
		t.Error("clientToken is not deterministic")
	}
	seen := map[string]string{}
	for name, tk := range map[string]string{
		"base":        tok,
		"spot":        clientToken("intent-1", spotA),
		"subnet":      clientToken("intent-1", subnetA),
		"other token": clientToken("intent-2", a),
		"long":        clientToken(long, a),
		"long+1":      clientToken(long+"y", a),
	} {
		if len(tk) > 64 {
			t.Errorf("%s: token %q is %d characters; EC2 takes 64", name, tk, len(tk))
		}
		for _, r := range tk {
			if r > 127 {
				t.Errorf("%s: token %q is not ASCII", name, tk)
			}
		}
		if other, dup := seen[tk]; dup {
			t.Errorf("%s and %s derive the same token %q", name, other, tk)
		}
		seen[tk] = name
	}
}

func TestOfferingMemory(t *testing.T) {
	clock := testutil.NewFakeClock()
	m := newOfferingMemory(time.Minute, clock.Now)
	a := offering{Type: "a", Zone: "z1", Spot: true}
	b := offering{Type: "a", Zone: "z1"}
	if m.skip(a) {
		t.Fatal("a fresh memory skips an offering")
	}
	m.fail(a)
	if !m.skip(a) {
		t.Error("a failed offering is not skipped")
	}
	if m.skip(b) {
		t.Error("the on-demand twin of a failed spot offering is skipped")
	}
	clock.Advance(59 * time.Second)
	if !m.skip(a) {
		t.Error("a failed offering is tried again before its minute is up")
	}
	clock.Advance(time.Second)
	if m.skip(a) {
		t.Error("a failed offering is still skipped after its minute")
	}
}

func TestRunInput(t *testing.T) {
	spec := cloud.LaunchSpec{
		UserData:        []byte("#!/bin/bash\necho hi\n"),
		Tags:            map[string]string{"b": "2", "a": "1"},
		ClientToken:     "intent-1",
		SecurityGroups:  []string{"sg-0123", "default"},
		KeyName:         "ops",
		InstanceProfile: "arn:aws:iam::123456789012:instance-profile/ci",
		RootVolumeGB:    40,
	}
	o := offering{Type: "t3.small", Subnet: "subnet-1", Spot: true}
	in := runInput(spec, image{ID: "ami-1", RootDevice: "/dev/xvda"}, o, 2)

	if got := aws.ToString(in.UserData); got != "IyEvYmluL2Jhc2gKZWNobyBoaQo=" {
		t.Errorf("UserData = %q, want base64 of the script", got)
	}
	if aws.ToInt32(in.MinCount) != 1 || aws.ToInt32(in.MaxCount) != 2 {
		t.Errorf("MinCount, MaxCount = %d, %d; want 1, 2 (what the offering has)", aws.ToInt32(in.MinCount), aws.ToInt32(in.MaxCount))
	}
	if got := aws.ToString(in.ClientToken); got != clientToken("intent-1", o) {
		t.Errorf("ClientToken = %q, want the offering's derived token", got)
	}
	if len(in.TagSpecifications) != 2 || in.TagSpecifications[0].ResourceType != types.ResourceTypeInstance || in.TagSpecifications[1].ResourceType != types.ResourceTypeVolume {
		t.Errorf("TagSpecifications = %+v, want instance and volume", in.TagSpecifications)
	}
	for _, ts := range in.TagSpecifications {
		if len(ts.Tags) != 2 || aws.ToString(ts.Tags[0].Key) != "a" || aws.ToString(ts.Tags[1].Value) != "2" {
			t.Errorf("%s tags = %+v, want a=1 b=2", ts.ResourceType, ts.Tags)
		}
	}
	if !slices.Equal(in.SecurityGroupIds, []string{"sg-0123"}) || !slices.Equal(in.SecurityGroups, []string{"default"}) {
		t.Errorf("SecurityGroupIds, SecurityGroups = %v, %v; want ids and names apart", in.SecurityGroupIds, in.SecurityGroups)
	}
	if aws.ToString(in.IamInstanceProfile.Arn) != spec.InstanceProfile || in.IamInstanceProfile.Name != nil {
		t.Errorf("IamInstanceProfile = %+v, want the ARN", in.IamInstanceProfile)
	}
	if aws.ToString(in.SubnetId) != "subnet-1" || in.Placement != nil {
		t.Errorf("SubnetId, Placement = %v, %+v; want subnet-1 and no placement", aws.ToString(in.SubnetId), in.Placement)
	}
	bdm := in.BlockDeviceMappings
	if len(bdm) != 1 || aws.ToString(bdm[0].DeviceName) != "/dev/xvda" || aws.ToInt32(bdm[0].Ebs.VolumeSize) != 40 || !aws.ToBool(bdm[0].Ebs.DeleteOnTermination) {
		t.Errorf("BlockDeviceMappings = %+v, want /dev/xvda 40 GB deleted on termination", bdm)
	}
	mo := in.InstanceMarketOptions
	if mo == nil || mo.MarketType != types.MarketTypeSpot || mo.SpotOptions.SpotInstanceType != types.SpotInstanceTypeOneTime || mo.SpotOptions.InstanceInterruptionBehavior != types.InstanceInterruptionBehaviorTerminate {
		t.Errorf("InstanceMarketOptions = %+v, want one-time spot terminated on interruption", mo)
	}
	if md := in.MetadataOptions; md == nil || md.HttpTokens != types.HttpTokensStateRequired || aws.ToInt32(md.HttpPutResponseHopLimit) != 1 {
		t.Errorf("MetadataOptions = %+v, want IMDSv2 required, hop limit 1", md)
	}

	plain := runInput(cloud.LaunchSpec{ClientToken: "x"}, image{ID: "ami-1"}, offering{Type: "t3.small", Zone: "z1"}, 1)
	if plain.UserData != nil || plain.TagSpecifications != nil || plain.BlockDeviceMappings != nil || plain.InstanceMarketOptions != nil || plain.KeyName != nil || plain.IamInstanceProfile != nil {
		t.Errorf("a bare spec sets optional fields: %+v", plain)
	}
	if aws.ToString(plain.Placement.AvailabilityZone) != "z1" || plain.SubnetId != nil {
		t.Errorf("zone offering: Placement %+v, SubnetId %v", plain.Placement, plain.SubnetId)
	}
	if p := runInput(cloud.LaunchSpec{InstanceProfile: "ci"}, image{}, offering{}, 1).IamInstanceProfile; aws.ToString(p.Name) != "ci" || p.Arn != nil {
		t.Errorf("IamInstanceProfile for a name = %+v", p)
	}
}

func TestMetadataOptions(t *testing.T) {
	tests := []struct {
		tokens string
		hops   int
		want   string // "" = none sent
	}{
		{"", 0, "required/1"},
		{"required", 2, "required/2"},
		{"optional", 3, "optional/3"},
		{"optional", 1, ""}, // EC2's own default: clouds without the parameter work
		{"optional", 0, ""},
	}
	for _, tc := range tests {
		md := metadataOptions(cloud.LaunchSpec{MetadataHTTPTokens: tc.tokens, MetadataHopLimit: tc.hops})
		got := ""
		if md != nil {
			got = fmt.Sprintf("%s/%d", md.HttpTokens, aws.ToInt32(md.HttpPutResponseHopLimit))
		}
		if got != tc.want {
			t.Errorf("metadataOptions(%q, %d) = %q, want %q", tc.tokens, tc.hops, got, tc.want)
		}
	}
}

// apiErr builds the error the SDK returns for an EC2 error response.
func apiErr(status int, code, msg string) error {
	return &smithy.OperationError{ServiceID: "EC2", OperationName: "RunInstances", Err: &awshttp.ResponseError{
		ResponseError: &smithyhttp.ResponseError{
			Response: &smithyhttp.Response{Response: &http.Response{StatusCode: status}},
			Err:      &smithy.GenericAPIError{Code: code, Message: msg},
		},
		RequestID: "req-1",
	}}
}

func TestErrorClasses(t *testing.T) {
	tests := []struct {
		err       error
		class     error
		uncertain bool
		retry     aws.Ternary
	}{
		{apiErr(500, "InsufficientInstanceCapacity", "no t3.small in us-east-1a"), cloud.ErrCapacity, false, aws.FalseTernary},
		{apiErr(400, "Unsupported", "not in this zone"), cloud.ErrCapacity, false, aws.FalseTernary},
		{apiErr(400, "SpotMaxPriceTooLow", ""), cloud.ErrCapacity, false, aws.FalseTernary},
		{apiErr(400, "MaxSpotInstanceCountExceeded", ""), cloud.ErrCapacity, false, aws.FalseTernary},
		{apiErr(400, "InsufficientFreeAddressesInSubnet", ""), cloud.ErrCapacity, false, aws.FalseTernary},
		{apiErr(400, "InstanceLimitExceeded", ""), cloud.ErrQuota, false, aws.FalseTernary},
		{apiErr(400, "VcpuLimitExceeded", ""), cloud.ErrQuota, false, aws.FalseTernary},
		{apiErr(503, "RequestLimitExceeded", ""), cloud.ErrThrottled, true, aws.TrueTernary},
		{apiErr(400, "Throttling", ""), cloud.ErrThrottled, true, aws.TrueTernary},
		{apiErr(400, "InvalidInstanceID.NotFound", ""), cloud.ErrNotFound, false, aws.FalseTernary},
		{apiErr(400, "InvalidAMIID.NotFound", ""), cloud.ErrNotFound, false, aws.FalseTernary},
		{apiErr(500, "InternalError", ""), nil, true, aws.UnknownTernary},
		{apiErr(503, "Unavailable", ""), nil, true, aws.UnknownTernary},
		{apiErr(400, "InvalidParameterValue", ""), nil, false, aws.UnknownTernary},
		{apiErr(400, "IdempotentParameterMismatch", ""), nil, false, aws.UnknownTernary},
		{fmt.Errorf("sending: %w", errors.New("connection reset")), nil, true, aws.UnknownTernary},
	}
	for _, tc := range tests {
		code := errorCode(tc.err)
		t.Run(cmpOrName(code), func(t *testing.T) {
			err := wrapErr("launching 1 t3.small", tc.err)
			for _, class := range []error{cloud.ErrCapacity, cloud.ErrQuota, cloud.ErrThrottled, cloud.ErrNotFound} {
				if got := errors.Is(err, class); got != errors.Is(class, tc.class) {
					t.Errorf("errors.Is(%v, %v) = %v", err, class, got)
				}
			}
			if got := uncertain(tc.err); got != tc.uncertain {
				t.Errorf("uncertain = %v, want %v", got, tc.uncertain)
			}
			if got := retryable(tc.err); got != tc.retry {
				t.Errorf("retryable = %v, want %v", got, tc.retry)
			}
			if !strings.HasPrefix(err.Error(), "launching 1 t3.small: ") || !strings.Contains(err.Error(), code) {
				t.Errorf("message %q does not say what was done and EC2's code", err)
			}
			if _, ok := errors.AsType[smithy.APIError](err); ok != (code != "") {
				t.Errorf("errors.As(APIError) = %v through the wrapper", ok)
			}
		})
	}
	got := wrapErr("terminating 1 ec2 instances", apiErr(400, "InvalidInstanceID.NotFound", "The instance ID 'i-1' does not exist")).Error()
	if want := "terminating 1 ec2 instances: EC2 InvalidInstanceID.NotFound: The instance ID 'i-1' does not exist (request req-1)"; got != want {
		t.Errorf("message = %q, want %q", got, want)
	}
}

func cmpOrName(code string) string {
	if code == "" {
		return "transport"
	}
	return code
}

func TestRequestCode(t *testing.T) {
	for err, want := range map[error]string{
		nil:                                     "",
		apiErr(503, "RequestLimitExceeded", ""): "RequestLimitExceeded",
		fmt.Errorf("x: %w", context.Canceled):   "Canceled",
		fmt.Errorf("x: %w", context.DeadlineExceeded): "Timeout",
		errors.New("dial tcp 127.0.0.1:1: refused"):   "RequestError",
	} {
		if got := requestCode(err); got != want {
			t.Errorf("requestCode(%v) = %q, want %q", err, got, want)
		}
	}
}

func TestIDsIn(t *testing.T) {
	batch := []string{"i-0123456789abcdef0", "i-1111aaaa", "i-2222bbbb"}
	tests := []struct{ msg, want string }{
		{"The instance ID 'i-1111aaaa' does not exist", "i-1111aaaa"},
		{"The instance IDs 'i-1111aaaa, i-0123456789abcdef0' do not exist", "i-1111aaaa,i-0123456789abcdef0"},
		{"Invalid id: \"i-2222bbbb\" (expecting \"i-...\")", "i-2222bbbb"},
		{"The instance ID 'i-9999cccc' does not exist", ""}, // not ours
		{"Something went wrong", ""},
	}
	for _, tc := range tests {
		got := strings.Join(idsIn(apiErr(400, "InvalidInstanceID.NotFound", tc.msg), batch), ",")
		if got != tc.want {
			t.Errorf("idsIn(%q) = %q, want %q", tc.msg, got, tc.want)
		}
	}
}

func TestParseImage(t *testing.T) {
	tests := []struct {
		in, id, owners, pattern string
	}{
		{"ami-0123456789abcdef0", "ami-0123456789abcdef0", "", ""},
		{"hangar-ci-*", "", "self", "hangar-ci-*"},
		{"ami-build-*", "", "self", "ami-build-*"}, // a pattern that starts like an id
		{"amazon:al2023-ami-2023.*-x86_64", "", "amazon", "al2023-ami-2023.*-x86_64"},
		{"099720109477, self:ubuntu/images/*24.04*", "", "099720109477,self", "ubuntu/images/*24.04*"},
	}
	for _, tc := range tests {
		r, err := parseImage(tc.in)
		if err != nil {
			t.Errorf("parseImage(%q): %v", tc.in, err)
			continue
		}
		if r.id != tc.id || strings.Join(r.owners, ",") != tc.owners || r.pattern != tc.pattern {
			t.Errorf("parseImage(%q) = id %q owners %v pattern %q", tc.in, r.id, r.owners, r.pattern)
		}
	}
	for _, bad := range []string{"", "  ", ":name", "amazon:"} {
		if _, err := parseImage(bad); err == nil {
			t.Errorf("parseImage(%q): no error", bad)
		}
	}
}

func TestNewerImage(t *testing.T) {
	img := func(id, name, created string) *types.Image {
		return &types.Image{ImageId: aws.String(id), Name: aws.String(name), CreationDate: aws.String(created)}
	}
	old := img("ami-1", "ci-1", "2025-01-01T00:00:00.000Z")
	mid := img("ami-2", "ci-2", "2025-06-01T00:00:00.000Z")
	sameTime := img("ami-3", "ci-3", "2025-06-01T00:00:00.000Z")
	if !newer(mid, old) || newer(old, mid) {
		t.Error("newer does not order by creation date")
	}
	if !newer(sameTime, mid) || newer(mid, sameTime) {
		t.Error("newer does not break a tie by name")
	}
	if !newer(old, nil) {
		t.Error("anything is newer than nothing")
	}
}

func TestStateOf(t *testing.T) {
	for name, want := range map[types.InstanceStateName]cloud.State{
		"pending":       cloud.StatePending,
		"running":       cloud.StateRunning,
		"stopping":      cloud.StateStopping,
		"stopped":       cloud.StateStopped,
		"shutting-down": cloud.StateTerminating,
		"terminated":    cloud.StateTerminated,
		"rebooting":     cloud.StateUnknown,
	} {
		if got := stateOf(name); got != want {
			t.Errorf("stateOf(%s) = %s, want %s", name, got, want)
		}
	}
	if got := toInstance(types.Instance{}).State; got != cloud.StateUnknown {
		t.Errorf("an instance without a state is %s", got)
	}
}
