package ec2test

import (
	"cmp"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
)

// These tests hold the server to EC2's service model as botocore ships it
// (Debian's python3-botocore), a source nobody here wrote: every element
// the server emits must be an output member of the action's shape, every
// scalar must parse as its type (and enum), and every parameter the server
// accepts must be an input member, named as the EC2 query serializer names
// it.

type shapeRef struct {
	Shape        string `json:"shape"`
	LocationName string `json:"locationName"`
	QueryName    string `json:"queryName"`
}

type shape struct {
	Type    string              `json:"type"`
	Members map[string]shapeRef `json:"members"`
	Member  *shapeRef           `json:"member"`
	Enum    []string            `json:"enum"`
}

type serviceModel struct {
	Metadata struct {
		APIVersion   string `json:"apiVersion"`
		Protocol     string `json:"protocol"`
		XMLNamespace string `json:"xmlNamespace"`
	} `json:"metadata"`
	Operations map[string]struct {
		Input  *shapeRef `json:"input"`
		Output *shapeRef `json:"output"`
	} `json:"operations"`
	Shapes map[string]shape `json:"shapes"`
}

func loadModel(t *testing.T) *serviceModel {
	t.Helper()
	var paths []string
	for _, g := range []string{
		"/usr/lib/python3/dist-packages/botocore/data/ec2/2016-11-15/service-2.json*",
		"/usr/share/python3-botocore/data/ec2/2016-11-15/service-2.json*",
	} {
		m, _ := filepath.Glob(g)
		paths = append(paths, m...)
	}
	if len(paths) == 0 {
		testutil.ToolMissing(t, "botocore's EC2 service model is not installed (apt-get install python3-botocore)")
	}
	f, err := os.Open(paths[0])
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var r io.Reader = f
	if strings.HasSuffix(paths[0], ".gz") {
		if r, err = gzip.NewReader(f); err != nil {
			t.Fatal(err)
		}
	}
	var m serviceModel
	if err := json.NewDecoder(r).Decode(&m); err != nil {
		t.Fatalf("reading %s: %v", paths[0], err)
	}
	if m.Metadata.APIVersion != apiVersion || m.Metadata.Protocol != "ec2" || m.Metadata.XMLNamespace+"/" != namespace {
		t.Fatalf("model %s is %+v, want EC2 %s", paths[0], m.Metadata, apiVersion)
	}
	return &m
}

// elementName is the name a member has in EC2's XML.
func elementName(name string, ref shapeRef) string { return cmp.Or(ref.LocationName, name) }

// queryName is the name the EC2 query serializer gives a member: its
// queryName, else its locationName capitalized, else its own name.
func queryName(name string, ref shapeRef) string {
	switch {
	case ref.QueryName != "":
		return ref.QueryName
	case ref.LocationName != "":
		return strings.ToUpper(ref.LocationName[:1]) + ref.LocationName[1:]
	}
	return name
}

// checkElement walks n against shape name and returns what the model does
// not allow.
func (m *serviceModel) checkElement(n *node, name, path string) []string {
	sh, ok := m.Shapes[name]
	if !ok {
		return []string{path + ": shape " + name + " not in model"}
	}
	var bad []string
	switch sh.Type {
	case "structure":
		for _, c := range n.children {
			found := false
			for mname, ref := range sh.Members {
				if elementName(mname, ref) == c.name {
					bad = append(bad, m.checkElement(c, ref.Shape, path+"/"+c.name)...)
					found = true
					break
				}
			}
			if !found {
				bad = append(bad, fmt.Sprintf("%s/%s: no such member in shape %s", path, c.name, name))
			}
		}
	case "list":
		item := cmp.Or(sh.Member.LocationName, "member")
		for _, c := range n.children {
			if c.name != item {
				bad = append(bad, fmt.Sprintf("%s/%s: list %s holds <%s> elements", path, c.name, name, item))
				continue
			}
			bad = append(bad, m.checkElement(c, sh.Member.Shape, path+"/"+c.name)...)
		}
	default:
		if len(n.children) > 0 {
			bad = append(bad, fmt.Sprintf("%s: scalar %s (%s) has child elements", path, name, sh.Type))
		}
		if msg := checkScalar(n.text, sh); msg != "" {
			bad = append(bad, path+": "+msg)
		}
	}
	return bad
}

func checkScalar(v string, sh shape) string {
	var err error
	switch sh.Type {
	case "boolean":
		if v != "true" && v != "false" {
			return fmt.Sprintf("boolean %q", v)
		}
	case "integer", "long":
		_, err = strconv.ParseInt(v, 10, 64)
	case "double", "float":
		_, err = strconv.ParseFloat(v, 64)
	case "timestamp":
		_, err = time.Parse(time.RFC3339Nano, v)
	case "string":
		if len(sh.Enum) > 0 && !slices.Contains(sh.Enum, v) {
			return fmt.Sprintf("%q is not one of the model's values %v", v, sh.Enum[:min(len(sh.Enum), 8)])
		}
	}
	if err != nil {
		return fmt.Sprintf("%q is not a %s: %v", v, sh.Type, err)
	}
	return ""
}

// checkResponse checks a whole response document against action's output.
func (m *serviceModel) checkResponse(action string, root *node) []string {
	op := m.Operations[action]
	var bad []string
	if root.name != action+"Response" {
		bad = append(bad, fmt.Sprintf("%s answered <%s>", action, root.name))
	}
	for _, c := range root.children {
		switch {
		case c.name == "requestId":
		// CreateTags has no output shape; EC2 still sends <return>.
		case op.Output == nil && c.name == "return":
		case op.Output == nil:
			bad = append(bad, fmt.Sprintf("%s/%s: the action has no output", action, c.name))
		default:
			bad = append(bad, m.checkElement(&node{children: []*node{c}}, op.Output.Shape, action)...)
		}
	}
	return bad
}

// checkParam resolves a query parameter pattern ("TagSpecification.N.Tag.N.Key")
// through the input shape down to a scalar.
func (m *serviceModel) checkParam(name string, segs []string) bool {
	sh := m.Shapes[name]
	if len(segs) == 0 {
		return sh.Type != "structure" && sh.Type != "list" && sh.Type != "map"
	}
	switch sh.Type {
	case "structure":
		for mname, ref := range sh.Members {
			if queryName(mname, ref) == segs[0] {
				return m.checkParam(ref.Shape, segs[1:])
			}
		}
	case "list":
		// The EC2 serializer numbers list members without naming them.
		return segs[0] == "N" && m.checkParam(sh.Member.Shape, segs[1:])
	}
	return false
}

// newerThanModel lists parameters the server accepts that Debian's
// botocore model is too old to have. Each is checked against a source just
// as foreign: the serializer of the aws-sdk-go-v2 EC2 client this module
// builds with.
var newerThanModel = map[string][]string{
	"RegisterImage": {"TagSpecification.N.ResourceType", "TagSpecification.N.Tag.N.Key", "TagSpecification.N.Tag.N.Value"},
	"CopyImage":     {"TagSpecification.N.ResourceType", "TagSpecification.N.Tag.N.Key", "TagSpecification.N.Tag.N.Value"},
}

func TestParametersAreInModel(t *testing.T) {
	t.Parallel()
	m := loadModel(t)
	for action, a := range actions {
		op, ok := m.Operations[action]
		if !ok {
			t.Errorf("%s is not an EC2 operation", action)
			continue
		}
		for _, p := range append([]string{"DryRun"}, a.params...) {
			if slices.Contains(newerThanModel[action], p) {
				continue
			}
			if !m.checkParam(op.Input.Shape, strings.Split(p, ".")) {
				t.Errorf("%s accepts %s, which %s does not have", action, p, op.Input.Shape)
			}
		}
	}
}

func TestNewerParametersAreInGoSDK(t *testing.T) {
	t.Parallel()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/aws/aws-sdk-go-v2/service/ec2").Output()
	if err != nil {
		testutil.ToolMissing(t, "cannot find the aws-sdk-go-v2 EC2 module (go mod download): %v", err)
	}
	src, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "serializers.go"))
	if err != nil {
		testutil.ToolMissing(t, "the aws-sdk-go-v2 EC2 module is not downloaded (go mod download): %v", err)
	}
	for action, params := range newerThanModel {
		if !slices.ContainsFunc(params, func(p string) bool { return slices.Contains(actions[action].params, p) }) {
			t.Errorf("newerThanModel lists %s parameters the server does not accept", action)
		}
		body := goSerializer(string(src), action)
		if body == "" {
			t.Errorf("no serializer for %s in the Go SDK", action)
			continue
		}
		for _, p := range params {
			top, _, _ := strings.Cut(p, ".")
			// Lists are FlatKey, scalars Key.
			if !strings.Contains(body, `Key("`+top+`")`) {
				t.Errorf("the Go SDK does not send %s with %s", top, action)
			}
		}
	}
}

// goSerializer returns the body of the Go SDK's query serializer for an
// action's input.
func goSerializer(src, action string) string {
	start := strings.Index(src, "func awsEc2query_serializeOpDocument"+action+"Input(")
	if start < 0 {
		return ""
	}
	end := strings.Index(src[start:], "\n}\n")
	return src[start : start+end]
}

// sampleResponses drives the server through every action with parameters
// that make it emit as many elements as it can, and returns the bodies.
func sampleResponses(t *testing.T) map[string][]reply {
	out := map[string][]reply{}
	// slow keeps instances, volumes, snapshots and images pending; fast
	// moves them on at once.
	hour := time.Hour
	slow := newServer(t, Options{BootDelay: hour, StopDelay: hour, VolumeDelay: hour, SnapshotDelay: hour, ImageDelay: hour})
	// fast has a second region and a backend, for public addresses.
	fast := newServer(t, Options{Regions: []string{"us-east-1", "eu-west-1"}, Backend: newMemBackend()})
	addIn := func(s *Server, region, action string, kv ...string) reply {
		r := mustCallIn(t, s, region, action, kv...)
		out[action] = append(out[action], r)
		return r
	}
	add := func(s *Server, action string, kv ...string) reply { return addIn(s, "us-east-1", action, kv...) }
	key := b64(string(publicKey(t, "ops@sample")))
	add(slow, "ImportKeyPair", "KeyName", "ops", "PublicKeyMaterial", key)
	add(fast, "ImportKeyPair", "KeyName", "ops", "PublicKeyMaterial", key,
		"TagSpecification.1.ResourceType", "key-pair", "TagSpecification.1.Tag.1.Key", "k", "TagSpecification.1.Tag.1.Value", "v")
	full := []string{
		"ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1",
		"InstanceType", "t3.small", "SubnetId", "subnet-us-east-1a", "KeyName", "ops",
		"SecurityGroupId.1", "sg-0123456789abcdef0", "IamInstanceProfile.Arn", "arn:aws:iam::123456789012:instance-profile/w",
		"MetadataOptions.HttpTokens", "required", "MetadataOptions.HttpPutResponseHopLimit", "1",
		"TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", "hangar:pool", "TagSpecification.1.Tag.1.Value", "demo",
		"UserData", b64("#!/bin/sh\n"), "ClientToken", "sample",
	}
	pendingID := add(slow, "RunInstances", full...).instanceIDs()[0]
	spotID := add(slow, "RunInstances", "ImageId", DefaultImageID, "MinCount", "2", "MaxCount", "2", "InstanceMarketOptions.MarketType", "spot").instanceIDs()[0]
	add(slow, "TerminateInstances", "InstanceId.1", spotID)
	add(slow, "DescribeInstances", "MaxResults", "5")
	add(slow, "DescribeInstanceAttribute", "InstanceId", pendingID, "Attribute", "userData")
	add(slow, "CreateTags", "ResourceId.1", pendingID, "Tag.1.Key", "k", "Tag.1.Value", "v")

	ids := add(fast, "RunInstances", full...).instanceIDs()
	ids = append(ids, mustCall(t, fast, "RunInstances", "ImageId", DefaultImageID, "MinCount", "2", "MaxCount", "2").instanceIDs()...)
	add(fast, "GetConsoleOutput", "InstanceId", ids[0])
	add(fast, "StopInstances", "InstanceId.1", ids[0], "InstanceId.2", ids[1])
	add(fast, "StartInstances", "InstanceId.1", ids[0])
	add(fast, "TerminateInstances", "InstanceId.1", ids[2])
	add(fast, "DescribeInstances")
	add(fast, "DescribeInstanceAttribute", "InstanceId", ids[0], "Attribute", "instanceType")
	fast.AddImage(Image{ID: "ami-0aaaaaaaaaaaaaaa1", Name: "worker", Owner: "123456789012", Tags: map[string]string{"os": "debian"}})
	add(fast, "DescribeImages", "Owner.1", "self")
	add(fast, "DescribeAvailabilityZones")
	addIn(fast, "eu-west-1", "DescribeAvailabilityZones")

	sampleStorage(t, slow, fast, add, addIn)
	return out
}

// sampleStorage adds samples of the volume, snapshot, image and key pair
// calls: slow shows what is pending, fast what is done.
func sampleStorage(t *testing.T, slow, fast *Server, add func(*Server, string, ...string) reply, addIn func(*Server, string, string, ...string) reply) {
	tagged := func(rt string) []string {
		return []string{"TagSpecification.1.ResourceType", rt, "TagSpecification.1.Tag.1.Key", "hangar:pool", "TagSpecification.1.Tag.1.Value", "s"}
	}
	add(fast, "DescribeKeyPairs", "IncludePublicKey", "true")
	add(fast, "DescribeKeyPairs", "KeyName.1", "ops", "Filter.1.Name", "key-type", "Filter.1.Value.1", "ed25519")

	// Pending things.
	run(t, slow, 1)
	slowVol := add(slow, "CreateVolume", append([]string{"AvailabilityZone", "us-east-1a", "Size", "10", "ClientToken", "v"}, tagged("volume")...)...).root.get("volumeId")
	add(slow, "DescribeVolumes", "VolumeId.1", slowVol)
	slowRoot := mustCall(t, slow, "DescribeInstances").root.get("reservationSet/item/instancesSet/item/blockDeviceMapping/item/ebs/volumeId")
	add(slow, "CreateSnapshot", append([]string{"VolumeId", slowRoot, "Description", "root"}, tagged("snapshot")...)...)
	add(slow, "DescribeSnapshots", "Owner.1", "self")
	// An instance must run to be imaged.
	imaging := newServer(t, Options{ImageDelay: time.Hour})
	add(imaging, "CreateImage", "InstanceId", run(t, imaging, 1).instanceIDs()[0], "Name", "pending-image")
	add(imaging, "DescribeImages", "Owner.1", "self", "Filter.1.Name", "state", "Filter.1.Value.1", "pending")

	// Done things, in the default region and copied to the other.
	id := run(t, fast, 1, "KeyName", "ops", "SubnetId", "subnet-us-east-1b").instanceIDs()[0]
	vol := add(fast, "CreateVolume", append([]string{"AvailabilityZone", "us-east-1b", "Size", "4", "VolumeType", "gp2", "Encrypted", "true"}, tagged("volume")...)...).root.get("volumeId")
	add(fast, "CreateVolume", "AvailabilityZone", "us-east-1b", "Size", "20", "VolumeType", "gp3", "Iops", "4000", "Throughput", "250")
	add(fast, "AttachVolume", "VolumeId", vol, "InstanceId", id, "Device", "/dev/sdf")
	add(fast, "DescribeVolumes", "Filter.1.Name", "attachment.instance-id", "Filter.1.Value.1", id)
	add(fast, "DescribeVolumes", "MaxResults", "5")
	add(fast, "DescribeInstances", "InstanceId.1", id)
	snap := add(fast, "CreateSnapshot", append([]string{"VolumeId", vol, "Description", "data"}, tagged("snapshot")...)...).root.get("snapshotId")
	add(fast, "DescribeSnapshots", "SnapshotId.1", snap)
	add(fast, "DescribeSnapshots", "MaxResults", "5", "Filter.1.Name", "tag:hangar:pool", "Filter.1.Value.1", "s")
	addIn(fast, "eu-west-1", "CopySnapshot", append([]string{"SourceRegion", "us-east-1", "SourceSnapshotId", snap, "DestinationRegion", "eu-west-1", "PresignedUrl", "https://example.invalid/"}, tagged("snapshot")...)...)
	addIn(fast, "eu-west-1", "DescribeSnapshots", "Owner.1", "self")
	ami := add(fast, "CreateImage", append([]string{"InstanceId", id, "Name", "created", "NoReboot", "true"}, tagged("image")...)...).root.get("imageId")
	add(fast, "RegisterImage", "Name", "registered", "Description", "from a snapshot", "Architecture", "arm64", "RootDeviceName", "/dev/xvda",
		"VirtualizationType", "hvm", "EnaSupport", "true", "BootMode", "uefi", "ImdsSupport", "v2.0",
		"BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", snap, "BlockDeviceMapping.1.Ebs.VolumeSize", "8",
		"BlockDeviceMapping.1.Ebs.VolumeType", "gp3", "BlockDeviceMapping.1.Ebs.DeleteOnTermination", "false")
	addIn(fast, "eu-west-1", "CopyImage", "SourceRegion", "us-east-1", "SourceImageId", ami, "Name", "copied", "Description", "a copy", "ClientToken", "c", "CopyImageTags", "true")
	add(fast, "DescribeImages", "ImageId.1", ami)
	addIn(fast, "eu-west-1", "DescribeImages", "Owner.1", "self", "Filter.1.Name", "tag-key", "Filter.1.Value.1", "hangar:pool")
	add(fast, "DeleteTags", "ResourceId.1", vol, "ResourceId.2", snap, "ResourceId.3", ami, "Tag.1.Key", "hangar:pool")
	add(fast, "DetachVolume", "VolumeId", vol, "Force", "true")
	add(fast, "DeleteVolume", "VolumeId", vol)
	add(fast, "DeregisterImage", "ImageId", ami)
	other := mustCall(t, fast, "CreateSnapshot", "VolumeId", mustCall(t, fast, "CreateVolume", "AvailabilityZone", "us-east-1a", "Size", "1").root.get("volumeId")).root.get("snapshotId")
	add(fast, "DeleteSnapshot", "SnapshotId", other)
	add(fast, "DeleteKeyPair", "KeyName", "ops")
}

func TestResponsesAreInModel(t *testing.T) {
	t.Parallel()
	m := loadModel(t)
	samples := sampleResponses(t)
	for action := range actions {
		if len(samples[action]) == 0 {
			t.Errorf("no sample response for %s: add one to sampleResponses", action)
		}
	}
	for action, replies := range samples {
		for _, r := range replies {
			for _, msg := range m.checkResponse(action, r.root) {
				t.Error(msg)
			}
		}
	}
}

// TestModelCheckCatchesMistakes shows the check above is not vacuous.
func TestModelCheckCatchesMistakes(t *testing.T) {
	t.Parallel()
	m := loadModel(t)
	doc := `<DescribeInstancesResponse><requestId>x</requestId><reservationSet><item>
		<instancesSet><item>
			<instanceID>i-1</instanceID>
			<instanceState><code>16</code><name>runing</name></instanceState>
			<launchTime>yesterday</launchTime>
			<tagSet><member><key>k</key></member></tagSet>
			<ebsOptimized>yes</ebsOptimized>
		</item></instancesSet></item></reservationSet></DescribeInstancesResponse>`
	bad := m.checkResponse("DescribeInstances", parseXML(t, []byte(doc)))
	for _, want := range []string{"instanceID: no such member", `"runing" is not one of`, `"yesterday" is not a timestamp`, "holds <item> elements", `boolean "yes"`} {
		if !slices.ContainsFunc(bad, func(s string) bool { return strings.Contains(s, want) }) {
			t.Errorf("check missed %q; found %q", want, bad)
		}
	}
	if m.checkParam("RunInstancesRequest", strings.Split("TagSpecifications.N.Tags.N.Key", ".")) ||
		m.checkParam("DescribeInstancesRequest", strings.Split("InstanceIds.member.N", ".")) ||
		!m.checkParam("RunInstancesRequest", strings.Split("TagSpecification.N.Tag.N.Key", ".")) {
		t.Error("checkParam does not tell EC2 query names from others")
	}
}
