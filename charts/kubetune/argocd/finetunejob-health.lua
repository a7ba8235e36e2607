-- Argo CD health of a kubetune.dev FineTuneJob (resource.customizations.health.kubetune.dev_FineTuneJob).
hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local phase = obj.status.phase
local message = obj.status.message or ""
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  if obj.status.adapterRef ~= nil then
    hs.message = "Succeeded: LoraAdapter " .. obj.status.adapterRef.name
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend)"
else
  hs.status = "Progressing"
  hs.message = phase
  local p = obj.status.progress
  if p ~= nil and p.totalSteps ~= nil then
    hs.message = phase .. ": step " .. p.step .. "/" .. p.totalSteps
  elseif message ~= "" then
    hs.message = phase .. ": " .. message
  end
end
return hs
