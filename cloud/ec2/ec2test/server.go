// Package ec2test is an EC2 Query API server for tests. It answers the
// actions Hangar uses with EC2's own XML, so that the real aws-sdk-go-v2 (or
// boto3) client can be pointed at it, and it injects the faults real EC2
// produces: throttling (request and instance buckets), capacity and quota
// errors, eventual consistency, and those of EC2-compatible clouds: a
// filter refused with a 400 or an HTML 500 (RefuseFilter). It signs
// instance identity documents (IdentityDocument) and keeps a timeline of
// requests (Timeline) for benchmarks.
//
// For a client under test:
//   - Give the SDK URL() as its endpoint, one of the server's regions
//     (default just us-east-1) and any static credentials. Requests must
//     carry a SigV4 Authorization header scoped to ec2 and to a region the
//     server serves; the signature itself is not checked. The scope's
//     region is the request's region: one server plays several regions,
//     each with its own instances, volumes, snapshots, images and key
//     pairs.
//   - Image DefaultImageID exists from the start in every region, and
//     subnet "subnet-<zone>" for each zone.
//   - Besides instances it serves key pairs, EBS volumes, snapshots and
//     images (storage.go), and with a Backend that implements
//     cloud.Storage it keeps their data there.
//   - Errors come with EC2's HTTP statuses, which decide what the SDK's
//     retryer does: 400 for client errors, 500 for
//     InsufficientInstanceCapacity and InternalError, 503 for
//     RequestLimitExceeded.
//   - A parameter the server does not serve is refused with
//     UnknownParameter rather than ignored, so a test never passes because
//     the server skipped what the client asked for.
package ec2test

// This file holds the HTTP side: authentication, the parameters each action
// accepts, and RunInstances' parameters. model.go holds regions, instances
// and faults, storage.go key pairs, volumes and snapshots, images.go
// images, xml.go the response shapes.

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// apiVersion is the only EC2 API version served; both SDKs send it.
const apiVersion = "2016-11-15"

// Options configures a Server. The zero value is a usable in-memory EC2.
type Options struct {
	// Region is the default region: the one the Server's own inspection
	// methods (Instances, Running, AddImage …) act on. Default Regions[0],
	// else "us-east-1".
	Region string
	// Regions are all the regions served; a request whose credential scope
	// names another fails as EC2 fails a region the account cannot use.
	// Default: just Region. Region is always served.
	Regions []string
	// Zones of the default region. Default Region+"a", "b", "c"; every
	// other region R has R+"a", "b", "c". Subnet "subnet-<zone>" exists for
	// each zone.
	Zones []string
	// Account is the owner id of reservations and of "self" images.
	// Default "123456789012".
	Account string
	// Backend, when set, really runs each instance (user-data included) and
	// is told of every terminate, stop and start. Its instance ids and
	// private and public addresses become the EC2 ones, so its ids must be
	// EC2-shaped ("i-" and 17 hex digits), as the local cloud's are.
	// Without a backend, instances exist only in memory. One backend
	// stands behind every region.
	//
	// A backend that also implements cloud.Storage gets the key pairs,
	// volumes and snapshots too, so that their data is real: see
	// storage.go.
	Backend cloud.Provider
	// Logger gets one debug line per request; nil discards.
	Logger *slog.Logger
	// BootDelay is how long an instance stays pending. Default 0.
	BootDelay time.Duration
	// StopDelay is how long an instance stays stopping or shutting-down.
	// Default 0: the next Describe already shows stopped or terminated.
	StopDelay time.Duration
	// TerminatedTTL is how long a terminated instance stays listed.
	// Default 1h, as on EC2.
	TerminatedTTL time.Duration
	// VolumeDelay is how long a new volume stays creating, and an
	// attachment attaching or detaching. Default 0: the next Describe
	// shows it available (attached, detached). CreateVolume, AttachVolume
	// and DetachVolume always answer creating, attaching, detaching, as
	// EC2 does.
	VolumeDelay time.Duration
	// SnapshotDelay is how long a created or copied snapshot stays pending,
	// its progress rising with time. Default 0.
	SnapshotDelay time.Duration
	// ImageDelay is how long a created, registered or copied image stays
	// pending; it also waits for its snapshots to complete. Default 0.
	ImageDelay time.Duration
	// IdentityKey signs the instances' identity documents
	// (IdentityDocument); nil: a key made on first use.
	IdentityKey *rsa.PrivateKey
}

// Server is a running EC2 test endpoint on 127.0.0.1. It is safe for
// concurrent use.
type Server struct {
	opts Options
	log  *slog.Logger
	hs   *httptest.Server
	state

	// identityMu guards idKey and idCert, made on first use (identity.go).
	identityMu sync.Mutex
	idKey      *rsa.PrivateKey
	idCert     []byte
}

// New starts a server. Close it when done.
func New(opts Options) *Server {
	if opts.Region == "" {
		opts.Region = "us-east-1"
		if len(opts.Regions) > 0 {
			opts.Region = opts.Regions[0]
		}
	}
	if !slices.Contains(opts.Regions, opts.Region) {
		opts.Regions = append([]string{opts.Region}, opts.Regions...)
	}
	if len(opts.Zones) == 0 {
		opts.Zones = defaultZones(opts.Region)
	}
	if opts.Account == "" {
		opts.Account = "123456789012"
	}
	if opts.TerminatedTTL <= 0 {
		opts.TerminatedTTL = time.Hour
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{opts: opts, log: log}
	s.state.init(opts)
	// httptest.NewServer listens on 127.0.0.1 only.
	s.hs = httptest.NewServer(http.HandlerFunc(s.serveHTTP))
	return s
}

// URL is the endpoint to give the SDK (BaseEndpoint / endpoint_url).
func (s *Server) URL() string { return s.hs.URL }

// Close stops the server. Backend instances are left to their owner.
func (s *Server) Close() { s.hs.Close() }

// apiError is an EC2 error response.
type apiError struct {
	Code, Message string
}

func (e *apiError) Error() string { return e.Code + ": " + e.Message }

func errorf(code, format string, args ...any) *apiError {
	return &apiError{Code: code, Message: fmt.Sprintf(format, args...)}
}

// httpStatus is the status EC2 sends with code. EC2 puts client errors on
// 4xx and server errors on 5xx; the SDKs retry 500 and 503 by status alone,
// so the split matters. Observed on the wire: InsufficientInstanceCapacity
// 500, RequestLimitExceeded 503.
func httpStatus(code string) int {
	switch code {
	case "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
		"InsufficientAddressCapacity", "InsufficientReservedInstanceCapacity",
		"InsufficientVolumeCapacity", "InternalError", "InternalFailure":
		return http.StatusInternalServerError
	case "RequestLimitExceeded", "Unavailable", "ServiceUnavailable":
		return http.StatusServiceUnavailable
	case "AuthFailure", "MissingAuthenticationToken":
		return http.StatusUnauthorized
	case "DryRunOperation":
		return http.StatusPreconditionFailed
	}
	return http.StatusBadRequest
}

// action is one served EC2 action.
type action struct {
	// params lists every parameter accepted, named as the EC2 query
	// serializer names them, with N for a list index. The model test
	// checks each against the botocore service model.
	params []string
	// serve answers the request, made in region rg.
	serve func(s *Server, ctx context.Context, rg *region, q query) (response, error)
}

// tagSpecParams are the TagSpecification parameters of the actions that
// tag what they create.
var tagSpecParams = []string{"TagSpecification.N.ResourceType", "TagSpecification.N.Tag.N.Key", "TagSpecification.N.Tag.N.Value"}

var filterParams = []string{"Filter.N.Name", "Filter.N.Value.N"}

// actions: what Hangar's EC2 provider calls. DryRun is accepted everywhere.
var actions = map[string]action{
	"RunInstances": {serve: (*Server).runInstances, params: []string{
		"ImageId", "InstanceType", "MinCount", "MaxCount", "ClientToken", "UserData",
		"KeyName", "SubnetId", "SecurityGroupId.N", "Placement.AvailabilityZone",
		"IamInstanceProfile.Name", "IamInstanceProfile.Arn",
		"BlockDeviceMapping.N.DeviceName", "BlockDeviceMapping.N.Ebs.VolumeSize",
		"BlockDeviceMapping.N.Ebs.VolumeType", "BlockDeviceMapping.N.Ebs.DeleteOnTermination",
		"BlockDeviceMapping.N.Ebs.Encrypted",
		"TagSpecification.N.ResourceType", "TagSpecification.N.Tag.N.Key", "TagSpecification.N.Tag.N.Value",
		"MetadataOptions.HttpTokens", "MetadataOptions.HttpPutResponseHopLimit", "MetadataOptions.HttpEndpoint",
		"InstanceMarketOptions.MarketType", "InstanceMarketOptions.SpotOptions.SpotInstanceType",
		"InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior", "InstanceMarketOptions.SpotOptions.MaxPrice",
		"InstanceInitiatedShutdownBehavior", "EbsOptimized", "Monitoring.Enabled",
	}},
	"DescribeInstances": {serve: (*Server).describeInstances, params: []string{
		"InstanceId.N", "Filter.N.Name", "Filter.N.Value.N", "MaxResults", "NextToken",
	}},
	"TerminateInstances": {serve: (*Server).terminateInstances, params: []string{"InstanceId.N"}},
	"StopInstances":      {serve: (*Server).stopInstances, params: []string{"InstanceId.N", "Force"}},
	"StartInstances":     {serve: (*Server).startInstances, params: []string{"InstanceId.N"}},
	"GetConsoleOutput":   {serve: (*Server).getConsoleOutput, params: []string{"InstanceId", "Latest"}},
	"DescribeImages": {serve: (*Server).describeImages, params: []string{
		"ImageId.N", "Owner.N", "Filter.N.Name", "Filter.N.Value.N", "IncludeDeprecated",
	}},
	"CreateTags": {serve: (*Server).createTags, params: []string{
		"ResourceId.N", "Tag.N.Key", "Tag.N.Value",
	}},
	"DeleteTags": {serve: (*Server).deleteTags, params: []string{
		"ResourceId.N", "Tag.N.Key", "Tag.N.Value",
	}},
	"DescribeInstanceAttribute": {serve: (*Server).describeInstanceAttribute, params: []string{
		"InstanceId", "Attribute",
	}},
	"DescribeAvailabilityZones": {serve: (*Server).describeAvailabilityZones, params: []string{
		"ZoneName.N", "Filter.N.Name", "Filter.N.Value.N", "AllAvailabilityZones",
	}},

	"ImportKeyPair": {serve: (*Server).importKeyPair, params: slices.Concat([]string{
		"KeyName", "PublicKeyMaterial",
	}, tagSpecParams)},
	"DescribeKeyPairs": {serve: (*Server).describeKeyPairs, params: slices.Concat([]string{
		"KeyName.N", "KeyPairId.N", "IncludePublicKey",
	}, filterParams)},
	"DeleteKeyPair": {serve: (*Server).deleteKeyPair, params: []string{"KeyName", "KeyPairId"}},

	"CreateVolume": {serve: (*Server).createVolume, params: slices.Concat([]string{
		"AvailabilityZone", "Size", "SnapshotId", "VolumeType", "Iops", "Throughput", "Encrypted", "ClientToken",
	}, tagSpecParams)},
	"DescribeVolumes": {serve: (*Server).describeVolumes, params: slices.Concat([]string{
		"VolumeId.N", "MaxResults", "NextToken",
	}, filterParams)},
	"AttachVolume": {serve: (*Server).attachVolume, params: []string{"VolumeId", "InstanceId", "Device"}},
	"DetachVolume": {serve: (*Server).detachVolume, params: []string{"VolumeId", "InstanceId", "Device", "Force"}},
	"DeleteVolume": {serve: (*Server).deleteVolume, params: []string{"VolumeId"}},

	"CreateSnapshot": {serve: (*Server).createSnapshot, params: slices.Concat([]string{
		"VolumeId", "Description",
	}, tagSpecParams)},
	"DescribeSnapshots": {serve: (*Server).describeSnapshots, params: slices.Concat([]string{
		"SnapshotId.N", "Owner.N", "MaxResults", "NextToken",
	}, filterParams)},
	"DeleteSnapshot": {serve: (*Server).deleteSnapshot, params: []string{"SnapshotId"}},
	// The SDKs fill in DestinationRegion and PresignedUrl themselves for a
	// copy between regions; the URL's signature is not checked.
	"CopySnapshot": {serve: (*Server).copySnapshot, params: slices.Concat([]string{
		"SourceRegion", "SourceSnapshotId", "Description", "DestinationRegion", "PresignedUrl", "Encrypted",
	}, tagSpecParams)},

	"CreateImage": {serve: (*Server).createImage, params: slices.Concat([]string{
		"InstanceId", "Name", "Description", "NoReboot",
	}, tagSpecParams)},
	// TagSpecification is newer than Debian's botocore model for
	// RegisterImage and CopyImage; model_test.go checks it against the Go
	// SDK's serializer instead.
	"RegisterImage": {serve: (*Server).registerImage, params: slices.Concat([]string{
		"Name", "Description", "Architecture", "RootDeviceName", "VirtualizationType", "EnaSupport",
		"BootMode", "ImdsSupport",
		"BlockDeviceMapping.N.DeviceName", "BlockDeviceMapping.N.Ebs.SnapshotId", "BlockDeviceMapping.N.Ebs.VolumeSize",
		"BlockDeviceMapping.N.Ebs.DeleteOnTermination", "BlockDeviceMapping.N.Ebs.VolumeType",
	}, tagSpecParams)},
	"CopyImage": {serve: (*Server).copyImage, params: slices.Concat([]string{
		"SourceRegion", "SourceImageId", "Name", "Description", "ClientToken", "CopyImageTags", "Encrypted",
	}, tagSpecParams)},
	"DeregisterImage": {serve: (*Server).deregisterImage, params: []string{"ImageId"}},
}

// response is an action's result; see header in xml.go.
type response interface{ setRequestID(string) }

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	requestID := newRequestID()
	name := ""
	//nolint:contextcheck // actions run under context.WithoutCancel(r.Context()) below: like EC2's, an action runs to its end when the client hangs up
	resp, err := func() (response, error) {
		if r.Method != http.MethodPost && r.Method != http.MethodGet {
			return nil, errorf("InvalidAction", "EC2 answers GET and POST, not %s", r.Method)
		}
		// Bodies past a few hundred KiB are not EC2 requests (its own limit
		// is lower); the cap keeps a broken client from eating memory.
		r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
		if err := r.ParseForm(); err != nil {
			return nil, errorf("MalformedQueryString", "cannot read the request: %v", err)
		}
		name = r.Form.Get("Action")
		s.countCall(name)
		rg, err := s.checkAuth(r)
		if err != nil {
			return nil, err
		}
		a, ok := actions[name]
		if !ok {
			return nil, errorf("InvalidAction", "The action %s is not valid for this web service.", name)
		}
		if v := r.Form.Get("Version"); v != apiVersion {
			if v == "" {
				return nil, errorf("MissingParameter", "The request must contain the parameter Version")
			}
			return nil, errorf("NoSuchVersion", "The requested version (%s) of service AmazonEC2 does not exist", v)
		}
		q := query{v: r.Form}
		if err := q.check(a.params); err != nil {
			return nil, err
		}
		if s.throttled(name) {
			return nil, errorf("RequestLimitExceeded", "Request limit exceeded.")
		}
		if dry, err := q.bool("DryRun"); err != nil {
			return nil, err
		} else if dry {
			return nil, errorf("DryRunOperation", "Request would have succeeded, but DryRun flag is set.")
		}
		// A launch the client stopped waiting for still happens on EC2;
		// a client timeout must not cancel backend work halfway.
		return a.serve(s, context.WithoutCancel(r.Context()), rg, q)
	}()
	code := ""
	if err != nil {
		code = s.writeError(w, name, requestID, err)
	} else {
		resp.setRequestID(requestID)
		s.writeXML(w, http.StatusOK, resp, xml.Name{Space: namespace, Local: name + "Response"})
	}
	s.recordSpan(name, Span{Start: start, End: time.Now(), Code: code})
	s.log.Debug("ec2test request", "action", name, "err", err, "took", time.Since(start))
}

// writeError answers err and returns the code it counted.
func (s *Server) writeError(w http.ResponseWriter, action, requestID string, err error) string {
	if errors.Is(err, errHTML500) {
		s.countError(action, "HTML500")
		w.Header().Set("Content-Type", "text/html")
		w.Header().Set("Content-Length", strconv.Itoa(len(htmlPage)))
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = io.WriteString(w, htmlPage)
		return "HTML500"
	}
	var ae *apiError
	if !errors.As(err, &ae) {
		ae = errorf("InternalError", "An internal error has occurred: %v", err)
	}
	s.countError(action, ae.Code)
	s.writeXML(w, httpStatus(ae.Code), &errorResponse{
		Errors:    []errorXML{{Code: ae.Code, Message: ae.Message}},
		RequestID: requestID,
	}, xml.Name{Local: "Response"})
	return ae.Code
}

func (s *Server) writeXML(w http.ResponseWriter, status int, v any, root xml.Name) {
	buf := bodyBuffers.Get().(*[]byte)
	defer func() {
		if cap(*buf) <= 16<<20 {
			bodyBuffers.Put(buf)
		}
	}()
	body, err := appendXMLDocument((*buf)[:0], v, root)
	if err != nil {
		s.log.Error("ec2test: encoding response", "err", err)
		http.Error(w, "encoding response", http.StatusInternalServerError)
		return
	}
	*buf = body
	w.Header().Set("Content-Type", "text/xml;charset=UTF-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// bodyBuffers keeps answers' buffers: a listing page is megabytes, and
// growing a fresh one for each page cost more than encoding it.
var bodyBuffers = sync.Pool{New: func() any { return new([]byte) }}

// appendXMLDocument appends the document writeXML sends: v as the root
// element, after the XML declaration.
func appendXMLDocument(b []byte, v any, root xml.Name) ([]byte, error) {
	f, ok := v.(fastXML)
	if !ok {
		slow, err := encodeXMLSlow(v, root)
		return append(b, slow...), err
	}
	b = append(b, xml.Header...)
	b = append(b, '<')
	b = append(b, root.Local...)
	if root.Space != "" {
		b = append(b, ` xmlns="`...)
		b = appendEscaped(b, root.Space)
		b = append(b, '"')
	}
	b = append(b, '>')
	b = f.appendXML(b)
	b = append(b, "</"...)
	b = append(b, root.Local...)
	return append(b, '>'), nil
}

func encodeXMLSlow(v any, root xml.Name) ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteString(xml.Header)
	if err := xml.NewEncoder(&buf).EncodeElement(v, xml.StartElement{Name: root}); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// checkAuth wants a SigV4 Authorization header scoped to ec2 and to a
// region the server serves, and returns that region. The signature is not
// checked: the point is that the client signs, and signs for a region the
// server stands for, so a misconfigured region fails here as it would on
// AWS.
//
// A region not served answers AuthFailure (HTTP 401), not
// UnauthorizedOperation: EC2 sends AuthFailure when it cannot accept the
// credentials in that region at all (a region the account has not opted
// into, or a scope the endpoint does not serve), while
// UnauthorizedOperation (403) means IAM denied an action, which a client
// would wrongly take for a permissions problem.
func (s *Server) checkAuth(r *http.Request) (*region, error) {
	h := r.Header.Get("Authorization")
	if h == "" {
		return nil, errorf("MissingAuthenticationToken", "The request must contain either a valid (registered) AWS access key ID or X.509 certificate.")
	}
	rest, ok := strings.CutPrefix(h, "AWS4-HMAC-SHA256 ")
	if !ok {
		return nil, errorf("AuthFailure", "Authorization header is not AWS4-HMAC-SHA256.")
	}
	var scope []string
	for field := range strings.SplitSeq(rest, ",") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(field), "Credential="); ok {
			scope = strings.Split(v, "/")
		}
	}
	// AKID/yyyymmdd/region/service/aws4_request
	if len(scope) != 5 || scope[0] == "" || scope[4] != "aws4_request" {
		return nil, errorf("AuthFailure", "Authorization header has no valid Credential scope.")
	}
	rg := s.regions[scope[2]]
	if rg == nil {
		return nil, errorf("AuthFailure", "Credential should be scoped to a valid region, not '%s'.", scope[2])
	}
	if scope[3] != "ec2" {
		return nil, errorf("AuthFailure", "Credential should be scoped to correct service: 'ec2'.")
	}
	return rg, nil
}

func newRequestID() string {
	b := make([]byte, 16)
	rand.Read(b)
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// query is a request's parameters.
type query struct{ v url.Values }

// pattern turns "Filter.2.Value.10" into "Filter.N.Value.N". Indexes start
// at 1 and have no leading zeros, as the SDKs write them.
func pattern(key string) string {
	parts := strings.Split(key, ".")
	for i, p := range parts {
		if p != "" && strings.Trim(p, "0123456789") == "" {
			if p[0] == '0' {
				return "" // no parameter has a zero or zero-padded index
			}
			parts[i] = "N"
		}
	}
	return strings.Join(parts, ".")
}

// check refuses parameters the action does not accept.
func (q query) check(accepted []string) error {
	for key := range q.v {
		if key == "Action" || key == "Version" || key == "DryRun" {
			continue
		}
		if !slices.Contains(accepted, pattern(key)) {
			return errorf("UnknownParameter", "The parameter %s is not recognized (ec2test serves a subset of EC2).", key)
		}
	}
	return nil
}

func (q query) str(name string) string { return q.v.Get(name) }

func (q query) has(name string) bool { _, ok := q.v[name]; return ok }

// indexes returns the list indexes used under prefix ("Filter" finds
// Filter.1.Name and Filter.2.Value.1 → 1, 2), in order.
func (q query) indexes(prefix string) []int {
	var out []int
	for key := range q.v {
		rest, ok := strings.CutPrefix(key, prefix+".")
		if !ok {
			continue
		}
		n, _, _ := strings.Cut(rest, ".")
		if i, err := strconv.Atoi(n); err == nil && i > 0 && !slices.Contains(out, i) {
			out = append(out, i)
		}
	}
	slices.Sort(out)
	return out
}

// list returns the values of prefix.1, prefix.2 … in index order.
func (q query) list(prefix string) []string {
	var out []string
	for _, i := range q.indexes(prefix) {
		if v, ok := q.v[prefix+"."+strconv.Itoa(i)]; ok {
			out = append(out, v[0])
		}
	}
	return out
}

// int reads an integer parameter; ok is false when it is absent.
func (q query) int(name string) (n int, ok bool, err error) {
	if !q.has(name) {
		return 0, false, nil
	}
	n, err = strconv.Atoi(q.str(name))
	if err != nil {
		return 0, false, errorf("InvalidParameterValue", "Invalid value '%s' for %s: not an integer.", q.str(name), name)
	}
	return n, true, nil
}

func (q query) bool(name string) (bool, error) {
	switch q.str(name) {
	case "", "false":
		return false, nil
	case "true":
		return true, nil
	}
	return false, errorf("InvalidParameterValue", "Invalid value '%s' for %s: expecting true or false.", q.str(name), name)
}

// filter is one Filter.N: a name and the values any of which may match.
type filter struct {
	name   string
	values []string
}

func (q query) filters() ([]filter, error) {
	var out []filter
	for _, i := range q.indexes("Filter") {
		p := "Filter." + strconv.Itoa(i)
		f := filter{name: q.str(p + ".Name"), values: q.list(p + ".Value")}
		if f.name == "" {
			return nil, errorf("MissingParameter", "The request must contain the parameter %s.Name", p)
		}
		if len(f.values) == 0 {
			return nil, errorf("InvalidParameterValue", "The filter '%s' requires a value.", f.name)
		}
		out = append(out, f)
	}
	return out, nil
}

// checkedFilters reads Filter.N, refusing a name not in allowed; tag:KEY
// is always allowed.
func (q query) checkedFilters(allowed []string) ([]filter, error) {
	filters, err := q.filters()
	if err != nil {
		return nil, err
	}
	for _, f := range filters {
		if !strings.HasPrefix(f.name, "tag:") && !slices.Contains(allowed, f.name) {
			return nil, errorf("InvalidParameterValue", "The filter '%s' is invalid", f.name)
		}
	}
	return filters, nil
}

// tags reads prefix.N.Key and prefix.N.Value with EC2's limits.
func (q query) tags(prefix string) (map[string]string, error) {
	out := map[string]string{}
	for _, i := range q.indexes(prefix) {
		p := prefix + "." + strconv.Itoa(i)
		k, v := q.str(p+".Key"), q.str(p+".Value")
		switch {
		case k == "":
			return nil, errorf("InvalidParameterValue", "Tag key must not be empty (%s.Key).", p)
		case strings.HasPrefix(strings.ToLower(k), "aws:"):
			return nil, errorf("InvalidParameterValue", "Tag keys starting with 'aws:' are reserved for internal use")
		case len(k) > 128:
			return nil, errorf("InvalidParameterValue", "Tag key exceeds the maximum length of 128 characters")
		case len(v) > 256:
			return nil, errorf("InvalidParameterValue", "Tag value exceeds the maximum length of 256 characters")
		}
		if _, dup := out[k]; dup {
			return nil, errorf("InvalidParameterValue", "Duplicate tag key '%s' specified.", k)
		}
		out[k] = v
	}
	if len(out) > 50 {
		return nil, errorf("TagLimitExceeded", "The maximum number of tags (50) per resource has been exceeded.")
	}
	return out, nil
}

// tagSpecs reads TagSpecification.N: the tags for each resource type, of
// those the action allows.
func (q query) tagSpecs(allowed ...string) (map[string]map[string]string, error) {
	out := map[string]map[string]string{}
	for _, i := range q.indexes("TagSpecification") {
		p := "TagSpecification." + strconv.Itoa(i)
		rt := q.str(p + ".ResourceType")
		switch {
		case rt == "":
			return nil, errorf("MissingParameter", "The request must contain the parameter %s.ResourceType", p)
		case !slices.Contains(allowed, rt):
			return nil, errorf("InvalidParameterValue", "'%s' is not a valid taggable resource type for this operation.", rt)
		case out[rt] != nil:
			return nil, errorf("InvalidParameterValue", "The same resource type may not be specified more than once in tag specifications")
		}
		tags, err := q.tags(p + ".Tag")
		if err != nil {
			return nil, err
		}
		out[rt] = tags
	}
	return out, nil
}

// id reads a required id parameter of the given prefix; malformed names
// the error code for a malformed one ("InvalidVolumeID.Malformed").
func (q query) id(name, prefix, malformed string) (string, error) {
	id := q.str(name)
	if id == "" {
		return "", errorf("MissingParameter", "The request must contain the parameter %s", name)
	}
	if !validID(id, prefix) {
		return "", errorf(malformed, "Invalid id: \"%s\" (expecting \"%s...\")", id, prefix)
	}
	return id, nil
}

// ids reads the optional list name.N of ids with prefix.
func (q query) ids(name, prefix, malformed string) ([]string, error) {
	ids := q.list(name)
	for _, id := range ids {
		if !validID(id, prefix) {
			return nil, errorf(malformed, "Invalid id: \"%s\" (expecting \"%s...\")", id, prefix)
		}
	}
	return ids, nil
}

// page reads MaxResults and NextToken as the describe calls with EC2's
// paging take them: MaxResults from 5 up (larger than most is cut to
// most), never together with a list of ids. after is the last sequence
// number a previous page showed.
func (q query) page(most int, withIDs bool) (limit int, after uint64, err error) {
	limit, paged, err := q.int("MaxResults")
	switch {
	case err != nil:
		return 0, 0, err
	case paged && withIDs:
		return 0, 0, errorf("InvalidParameterCombination", "The parameter MaxResults cannot be used with a list of ids.")
	case paged && limit < 5:
		return 0, 0, errorf("InvalidParameterValue", "Value ( %d ) for parameter maxResults is invalid. Expecting a value greater than 5.", limit)
	case !paged:
		limit = math.MaxInt
	}
	if tok := q.str("NextToken"); tok != "" {
		if after, err = decodeToken(tok); err != nil {
			return 0, 0, err
		}
	}
	return min(limit, most), after, nil
}

// instanceIDs reads InstanceId.N, all well formed, at least one.
func (q query) instanceIDs() ([]string, error) {
	ids := q.list("InstanceId")
	if len(ids) == 0 {
		return nil, errorf("MissingParameter", "The request must contain the parameter InstanceId")
	}
	for _, id := range ids {
		if err := checkInstanceID(id); err != nil {
			return nil, err
		}
	}
	return ids, nil
}

func checkInstanceID(id string) error {
	if !validID(id, "i-") {
		return errorf("InvalidInstanceID.Malformed", "Invalid id: \"%s\" (expecting \"i-...\")", id)
	}
	return nil
}

// validID: prefix then 8 or 17 lower-case hex digits, EC2's two id lengths.
func validID(id, prefix string) bool {
	h, ok := strings.CutPrefix(id, prefix)
	if !ok || len(h) != 8 && len(h) != 17 {
		return false
	}
	return strings.Trim(h, "0123456789abcdef") == ""
}

// ---- RunInstances parameters ----

type runRequest struct {
	image                                Image
	typ, zone, subnet, market, keyName   string
	profile, profileID, token            string
	httpTokens, httpEndpoint             string
	groups                               []string
	userData                             []byte
	tags, volumeTags                     map[string]string
	rootGB, hopLimit, minCount, maxCount int
	fingerprint                          string
}

func (s *Server) parseRun(rg *region, q query) (*runRequest, error) {
	req := &runRequest{typ: q.str("InstanceType"), token: q.str("ClientToken"), keyName: q.str("KeyName"), market: marketOnDemand}
	var err error
	if req.image, err = s.image(rg, q.str("ImageId")); err != nil {
		return nil, err
	}
	if req.keyName != "" && !s.hasKeyPair(rg, req.keyName) {
		return nil, errorf("InvalidKeyPair.NotFound", "The key pair '%s' does not exist", req.keyName)
	}
	if req.typ == "" {
		req.typ = "m1.small" // EC2's default
	} else if !validInstanceType(req.typ) {
		return nil, errorf("InvalidParameterValue", "Invalid value '%s' for InstanceType.", req.typ)
	}
	for _, c := range []struct {
		name string
		to   *int
	}{{"MinCount", &req.minCount}, {"MaxCount", &req.maxCount}} {
		n, ok, err := q.int(c.name)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, errorf("MissingParameter", "The request must contain the parameter %s", c.name)
		}
		if n < 1 {
			return nil, errorf("InvalidParameterValue", "Value (%d) for parameter %s is invalid. Expected a positive integer.", n, c.name)
		}
		*c.to = n
	}
	if req.maxCount < req.minCount {
		return nil, errorf("InvalidParameterValue", "MaxCount (%d) must not be less than MinCount (%d).", req.maxCount, req.minCount)
	}
	if len(req.token) > 64 {
		return nil, errorf("InvalidParameterValue", "Value for parameter clientToken is invalid: longer than 64 characters.")
	}
	if err := s.parsePlacement(rg, q, req); err != nil {
		return nil, err
	}
	for _, g := range q.list("SecurityGroupId") {
		if !validID(g, "sg-") {
			return nil, errorf("InvalidGroupId.Malformed", "Invalid id: \"%s\" (expecting \"sg-...\")", g)
		}
		req.groups = append(req.groups, g)
	}
	if err := s.parseProfile(q, req); err != nil {
		return nil, err
	}
	if ud := q.str("UserData"); ud != "" {
		b, err := base64.StdEncoding.DecodeString(ud)
		if err != nil {
			return nil, errorf("InvalidParameterValue", "Invalid BASE64 encoding of user data.")
		}
		if len(b) > maxUserData {
			return nil, errorf("InvalidParameterValue", "User data is limited to 16384 bytes")
		}
		req.userData = b
	}
	if err := parseTagSpecs(q, req); err != nil {
		return nil, err
	}
	if err := parseRootVolume(q, req); err != nil {
		return nil, err
	}
	if err := parseMetadataAndMarket(q, req); err != nil {
		return nil, err
	}
	for name, allowed := range map[string][]string{
		"InstanceInitiatedShutdownBehavior": {"stop", "terminate"},
		"EbsOptimized":                      {"true", "false"},
		"Monitoring.Enabled":                {"true", "false"},
	} {
		if v := q.str(name); q.has(name) && !slices.Contains(allowed, v) {
			return nil, errorf("InvalidParameterValue", "Value (%s) for parameter %s is invalid.", v, name)
		}
	}
	req.fingerprint = fingerprint(q)
	return req, nil
}

// parsePlacement picks the zone: the subnet's, else Placement's, else the
// first zone. Subnets are "subnet-<zone>".
func (s *Server) parsePlacement(rg *region, q query, req *runRequest) error {
	az := q.str("Placement.AvailabilityZone")
	if az != "" && !slices.Contains(rg.zones, az) {
		return errorf("InvalidParameterValue", "Invalid availability zone: [%s]", az)
	}
	if req.subnet = q.str("SubnetId"); req.subnet != "" {
		zone, _ := strings.CutPrefix(req.subnet, "subnet-")
		if !slices.Contains(rg.zones, zone) {
			return errorf("InvalidSubnetID.NotFound", "The subnet ID '%s' does not exist", req.subnet)
		}
		if az != "" && az != zone {
			return errorf("InvalidParameterValue", "Subnet %s is in %s, not in the requested Availability Zone %s.", req.subnet, zone, az)
		}
		req.zone = zone
		return nil
	}
	req.zone = cmp.Or(az, rg.zones[0])
	req.subnet = "subnet-" + req.zone // the zone's default subnet
	return nil
}

func (s *Server) parseProfile(q query, req *runRequest) error {
	name, arn := q.str("IamInstanceProfile.Name"), q.str("IamInstanceProfile.Arn")
	switch {
	case name != "" && arn != "":
		return errorf("InvalidParameterCombination", "The parameter 'iamInstanceProfile.name' may not be used in combination with 'iamInstanceProfile.arn'")
	case arn != "":
		if !strings.HasPrefix(arn, "arn:") || !strings.Contains(arn, ":instance-profile/") {
			return errorf("InvalidParameterValue", "Value (%s) for parameter iamInstanceProfile.arn is invalid. Invalid IAM Instance Profile ARN", arn)
		}
		req.profile = arn
	case name != "":
		req.profile = "arn:aws:iam::" + s.opts.Account + ":instance-profile/" + name
	}
	if req.profile != "" {
		req.profileID = "AIPA" + strings.ToUpper(newHexID("")[:17])
	}
	return nil
}

func parseTagSpecs(q query, req *runRequest) error {
	// EC2 accepts network-interface and spot-instances-request too;
	// nothing here shows them.
	specs, err := q.tagSpecs("instance", "volume", "network-interface", "spot-instances-request")
	if err != nil {
		return err
	}
	req.tags, req.volumeTags = specs["instance"], specs["volume"]
	return nil
}

func parseRootVolume(q query, req *runRequest) error {
	for _, i := range q.indexes("BlockDeviceMapping") {
		p := "BlockDeviceMapping." + strconv.Itoa(i)
		dev := q.str(p + ".DeviceName")
		if dev == "" {
			return errorf("MissingParameter", "The request must contain the parameter %s.DeviceName", p)
		}
		size, ok, err := q.int(p + ".Ebs.VolumeSize")
		if err != nil {
			return err
		}
		if ok && (size < 1 || size > 16384) {
			return errorf("InvalidParameterValue", "Volume of size %dGB is out of range [1, 16384].", size)
		}
		if ok && size < req.image.RootVolumeGB && dev == req.image.RootDevice {
			return errorf("InvalidBlockDeviceMapping", "Volume of size %dGB is smaller than snapshot '%s', expect size >= %dGB", size, req.image.root().SnapshotID, req.image.RootVolumeGB)
		}
		if vt := q.str(p + ".Ebs.VolumeType"); vt != "" && !slices.Contains([]string{"standard", "io1", "io2", "gp2", "sc1", "st1", "gp3"}, vt) {
			return errorf("InvalidParameterValue", "Value (%s) for parameter volumeType is invalid.", vt)
		}
		for _, b := range []string{".Ebs.DeleteOnTermination", ".Ebs.Encrypted"} {
			if _, err := q.bool(p + b); err != nil {
				return err
			}
		}
		if dev == req.image.RootDevice {
			req.rootGB = size
		}
	}
	return nil
}

func parseMetadataAndMarket(q query, req *runRequest) error {
	// EC2's defaults when a launch says nothing.
	req.httpTokens, req.httpEndpoint, req.hopLimit = "optional", "enabled", 1
	if v := q.str("MetadataOptions.HttpTokens"); v != "" {
		if v != "optional" && v != "required" {
			return errorf("InvalidParameterValue", "Value (%s) for parameter HttpTokens is invalid.", v)
		}
		req.httpTokens = v
	}
	if v := q.str("MetadataOptions.HttpEndpoint"); v != "" {
		if v != "enabled" && v != "disabled" {
			return errorf("InvalidParameterValue", "Value (%s) for parameter HttpEndpoint is invalid.", v)
		}
		req.httpEndpoint = v
	}
	if n, ok, err := q.int("MetadataOptions.HttpPutResponseHopLimit"); err != nil {
		return err
	} else if ok {
		if n < 1 || n > 64 {
			return errorf("InvalidParameterValue", "Value (%d) for parameter HttpPutResponseHopLimit is invalid. Valid values are 1 to 64.", n)
		}
		req.hopLimit = n
	}
	switch mt := q.str("InstanceMarketOptions.MarketType"); mt {
	case "":
		if q.has("InstanceMarketOptions.SpotOptions.SpotInstanceType") || q.has("InstanceMarketOptions.SpotOptions.MaxPrice") {
			return errorf("InvalidParameterCombination", "SpotOptions require InstanceMarketOptions.MarketType spot.")
		}
	case "spot":
		req.market = marketSpot
	default:
		return errorf("InvalidParameterValue", "Value (%s) for parameter MarketType is invalid.", mt)
	}
	if v := q.str("InstanceMarketOptions.SpotOptions.SpotInstanceType"); v != "" && v != "one-time" && v != "persistent" {
		return errorf("InvalidParameterValue", "Value (%s) for parameter SpotInstanceType is invalid.", v)
	}
	if v := q.str("InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"); v != "" && !slices.Contains([]string{"hibernate", "stop", "terminate"}, v) {
		return errorf("InvalidParameterValue", "Value (%s) for parameter InstanceInterruptionBehavior is invalid.", v)
	}
	if v := q.str("InstanceMarketOptions.SpotOptions.MaxPrice"); v != "" {
		if f, err := strconv.ParseFloat(v, 64); err != nil || f <= 0 {
			return errorf("InvalidParameterValue", "Value (%s) for parameter MaxPrice is invalid.", v)
		}
	}
	return nil
}

// fingerprint is every parameter but the token, in a fixed order: EC2
// compares a repeated ClientToken's arguments with the first request's.
func fingerprint(q query) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(q.v)) {
		if k == "ClientToken" || k == "Action" || k == "Version" {
			continue
		}
		fmt.Fprintf(&b, "%s=%q&", k, q.v[k])
	}
	return b.String()
}

// validInstanceType: family.size, the shape of every EC2 type name.
func validInstanceType(t string) bool {
	fam, size, ok := strings.Cut(t, ".")
	return ok && fam != "" && size != "" && strings.Trim(fam, "abcdefghijklmnopqrstuvwxyz0123456789-") == "" &&
		strings.Trim(size, "abcdefghijklmnopqrstuvwxyz0123456789-") == ""
}

// image finds an available image to launch from.
func (s *Server) image(rg *region, id string) (Image, error) {
	if id == "" {
		return Image{}, errorf("MissingParameter", "The request must contain the parameter ImageId")
	}
	if !validID(id, "ami-") {
		return Image{}, errorf("InvalidAMIID.Malformed", "Invalid id: \"%s\" (expecting \"ami-...\")", id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	im := s.findImage(rg, id, time.Now())
	switch {
	case im == nil:
		return Image{}, errorf("InvalidAMIID.NotFound", "The image id '[%s]' does not exist", id)
	case im.State != cloud.ImageAvailable:
		return Image{}, errorf("InvalidAMIID.Unavailable", "The image id '[%s]' is not available (%s)", id, im.State)
	}
	return *im, nil
}
