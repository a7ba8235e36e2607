-- Argo CD health of a kubetune.dev LoraAdapter (resource.customizations.health.kubetune.dev_LoraAdapter).
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
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = obj.status.message or "Failed"
  return hs
end
if phase ~= "Ready" then
  hs.status = "Progressing"
  hs.message = phase
  return hs
end
-- Ready, but the stage the spec asks for may be held back by the evaluation gate.
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Promoted" and c.status == "False" then
      hs.status = "Degraded"
      hs.message = c.message
      return hs
    end
  end
end
hs.status = "Healthy"
hs.message = "Ready (stage " .. (obj.status.stage or "candidate") .. ")"
return hs
